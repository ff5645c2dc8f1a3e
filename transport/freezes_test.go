package transport

import (
	"testing"
	"time"
)

func TestCommittedFreezes(t *testing.T) {
	sent := time.Unix(1000, 0)
	// Round trip 10 ms, of which the target spent 6: 2 ms each way.
	c := &Committed{Elapsed: 6 * time.Millisecond, Resumed: []uint32{1500, 0, 4000}}
	ends, ok := c.Freezes(sent, sent.Add(10*time.Millisecond))
	if !ok || len(ends) != 3 {
		t.Fatalf("Freezes: %v %v", ends, ok)
	}
	if got, want := ends[0].Sub(sent), 3500*time.Microsecond; got != want {
		t.Errorf("connection 0 resumed %v after COMMIT was sent, want %v", got, want)
	}
	if !ends[1].IsZero() {
		t.Errorf("connection 1 was not resumed but has an end %v", ends[1])
	}
	if got, want := ends[2].Sub(sent), 6*time.Millisecond; got != want {
		t.Errorf("connection 2 resumed %v after COMMIT was sent, want %v", got, want)
	}
	for _, bad := range []*Committed{
		{Resumed: []uint32{1}},                                 // no elapsed: an older target
		{Elapsed: time.Millisecond},                            // no offsets
		{Elapsed: 20 * time.Millisecond, Resumed: []uint32{1}}, // longer than the round trip
	} {
		if _, ok := bad.Freezes(sent, sent.Add(10*time.Millisecond)); ok {
			t.Errorf("Freezes(%+v) accepted", bad)
		}
	}
}
