package repair

import (
	"testing"

	"golang.org/x/sys/unix"
)

// TestZeroBlank checks that a Blank that holds no socket (the zero value,
// a used one) fits nothing and that closing it leaves descriptor 0 alone.
func TestZeroBlank(t *testing.T) {
	if _, err := unix.FcntlInt(0, unix.F_GETFD, 0); err != nil {
		// Descriptor 0 is closed: open one there, so Close has
		// something to get wrong.
		fd, err := unix.Open("/dev/null", unix.O_RDONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if fd != 0 {
			unix.Close(fd)
			t.Fatalf("/dev/null opened as %d, not 0", fd)
		}
		defer unix.Close(fd)
	}
	var zero Blank
	if zero.Fits(&Snapshot{}) {
		t.Error("the zero Blank fits the zero Snapshot")
	}
	for i := 0; i < 2; i++ {
		if err := zero.Close(); err != nil {
			t.Errorf("Close of the zero Blank: %v", err)
		}
	}
	if _, err := unix.FcntlInt(0, unix.F_GETFD, 0); err != nil {
		t.Fatalf("descriptor 0 after closing the zero Blank: %v", err)
	}
	var none *Blank
	if none.Fits(&Snapshot{}) || none.Close() != nil {
		t.Error("a nil Blank fits or fails to close")
	}
}
