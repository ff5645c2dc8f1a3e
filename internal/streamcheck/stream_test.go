package streamcheck

import "testing"

// TestStateRoundTrip checks that an endpoint rebuilt from another's State
// continues at the same offsets, and that a state of the wrong length is
// refused.
func TestStateRoundTrip(t *testing.T) {
	a := NewEndpoint(0, 1)
	a.SetOffsets(1<<40+3, 7)
	st := a.State()
	if len(st) != StateLen {
		t.Fatalf("State is %d bytes, want %d", len(st), StateLen)
	}
	b := NewEndpoint(0, 1)
	if err := b.SetState(st); err != nil {
		t.Fatal(err)
	}
	if b.Sent() != a.Sent() || b.Checked() != a.Checked() {
		t.Errorf("rebuilt at %d/%d, want %d/%d", b.Sent(), b.Checked(), a.Sent(), a.Checked())
	}
	if err := b.SetState(st[:8]); err == nil {
		t.Error("SetState took 8 bytes")
	}
}
