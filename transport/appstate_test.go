package transport

import (
	"bytes"
	"context"
	"testing"
)

// TestAppStateRoundTrip sends the application's state with snapshots, and
// without it, over every kind of link.
func TestAppStateRoundTrip(t *testing.T) {
	forKinds(t, func(t *testing.T, k kind) {
		cl, sv := linkPair(t, k, nil)
		ctx := context.Background()
		w, err := cl.OpenSnapshotStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		states := [][]byte{[]byte("offset=1234;parser=header"), nil, bytes.Repeat([]byte{7}, 100<<10)}
		go func() {
			for i, st := range states {
				s := queueSnap(1000)
				if err := w.WriteState(uint32(i), s, st); err != nil {
					t.Error(err)
				}
			}
			if err := w.Close(); err != nil {
				t.Error(err)
			}
		}()
		r, err := sv.AcceptSnapshotStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		for i, want := range states {
			idx, s, st, err := r.NextState()
			if err != nil {
				t.Fatal(err)
			}
			if idx != uint32(i) || s == nil || !bytes.Equal(st, want) || (want == nil) != (st == nil) {
				t.Errorf("record %d: index %d, state of %d bytes, want %d bytes", i, idx, len(st), len(want))
			}
		}
		if _, _, _, err := r.NextState(); err == nil {
			t.Error("no end after the last record")
		}
	})
}
