package repair

import (
	"errors"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// TestInspector checks that an Inspector, answering from one sock_diag dump,
// says what Inspect says socket by socket: the shutdown bits, the TCP-MD5
// refusal, and for a socket opened after its dump (found by a lookup of its
// own) the same again.
func TestInspector(t *testing.T) {
	ns := solo(t)
	plainCl, plainSv := pair(t, ns, 0, nil, nil)
	md5 := func(fd int) error { return setMD5Key(fd, netip.MustParseAddr("127.0.0.1"), "tcpmigrate-test") }
	md5Cl, _ := pair(t, ns, 0, md5, md5)
	shutCl, _ := pair(t, ns, 0, nil, nil)
	if err := unix.Shutdown(shutCl, unix.SHUT_RD); err != nil {
		t.Fatal(err)
	}

	var in Inspector
	check := func(name string, fd int) {
		t.Helper()
		var want, got Snapshot
		var werr, gerr error
		if err := ns.Do(func() error {
			werr = Inspect(fd, &want)
			gerr = in.Inspect(fd, &got)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if (werr == nil) != (gerr == nil) || werr != nil && werr.Error() != gerr.Error() {
			t.Errorf("%s: Inspector says %v, Inspect says %v", name, gerr, werr)
			return
		}
		if werr == nil && (got.Shutdown != want.Shutdown || got.Local != want.Local || got.Remote != want.Remote || got.State != want.State) {
			t.Errorf("%s: Inspector %+v, Inspect %+v", name, got, want)
		}
	}
	check("plain client", plainCl)
	check("plain server", plainSv)
	check("md5", md5Cl)
	check("shut read", shutCl)

	var ue *UnsupportedError
	var s Snapshot
	if err := ns.Do(func() error { return in.Inspect(md5Cl, &s) }); !errors.As(err, &ue) || ue.Reason != ReasonMD5 {
		t.Errorf("Inspector on an MD5 socket: %v, want refusal %s", err, ReasonMD5)
	}
	if err := ns.Do(func() error { return in.Inspect(shutCl, &s) }); err != nil || s.Shutdown&ShutRead == 0 {
		t.Errorf("Inspector on a socket shut for reading: %v, shutdown %v", err, s.Shutdown)
	}
	// They were answered from the dump, not by lookups of their own.
	for _, fd := range []int{plainCl, plainSv, md5Cl, shutCl} {
		cookie := cookieOf(t, fd)
		if _, ok := in.dumps[unix.AF_INET][cookie]; !ok {
			t.Errorf("socket %d (cookie %d) is not in the dump of %d sockets", fd, cookie, len(in.dumps[unix.AF_INET]))
		}
	}
	if info := in.dumps[unix.AF_INET][cookieOf(t, md5Cl)]; !info.md5 {
		t.Error("the dump does not show the MD5 key")
	}

	// Opened after the dump: not in it, looked up on its own.
	lateCl, _ := pair(t, ns, 0, md5, md5)
	check("md5, opened after the dump", lateCl)
}

func cookieOf(t *testing.T, fd int) uint64 {
	t.Helper()
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
