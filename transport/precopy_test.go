package transport

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"testing"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// TestPasses streams a pre-copy that is confirmed and one that a final
// record replaces, and checks what NextRecord returns and that NextState
// refuses a pre-copy.
func TestPasses(t *testing.T) {
	forKinds(t, func(t *testing.T, k kind) {
		cl, sv := linkPair(t, k, nil)
		ctx := context.Background()
		a, b := queueSnap(3), queueSnap(5)
		b2 := queueSnap(7)
		errc := make(chan error, 1)
		go func() {
			w, err := cl.OpenSnapshotStream(ctx)
			if err != nil {
				errc <- err
				return
			}
			for _, step := range []func() error{
				func() error { return w.WritePre(0, a, []byte("app")) },
				func() error { return w.WritePre(1, b, nil) },
				func() error { return w.Confirm(0) },
				func() error { return w.Write(1, b2) },
			} {
				if err := step(); err != nil {
					w.Abort()
					errc <- err
					return
				}
			}
			errc <- w.Close()
		}()
		r, err := sv.AcceptSnapshotStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		want := []struct {
			index uint32
			pass  Pass
			queue int
			state string
		}{{0, PassPre, 3, "app"}, {1, PassPre, 5, ""}, {0, PassConfirm, 0, ""}, {1, PassFinal, 7, ""}}
		for _, w := range want {
			rec, err := r.NextRecord()
			if err != nil {
				t.Fatal(err)
			}
			if rec.Index != w.index || rec.Pass != w.pass || len(rec.Snap.RecvQueue) != w.queue || string(rec.State) != w.state {
				t.Fatalf("got index %d pass %s, %d queued bytes, state %q; want %d %s %d %q",
					rec.Index, rec.Pass, len(rec.Snap.RecvQueue), rec.State, w.index, w.pass, w.queue, w.state)
			}
		}
		if _, err := r.NextRecord(); err != io.EOF {
			t.Fatalf("after the last record: %v, want io.EOF", err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}

		// A reader of final records only refuses a pre-copy.
		go func() {
			w, err := cl.OpenSnapshotStream(ctx)
			if err == nil {
				w.WritePre(2, a, nil)
				w.Close()
			}
		}()
		r2, err := sv.AcceptSnapshotStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer r2.Close()
		if _, _, _, err := r2.NextState(); !errors.Is(err, ErrMalformed) {
			t.Fatalf("NextState on a pre-copy: %v, want ErrMalformed", err)
		}
	})
}

// TestPassOrder checks the link's rules for the passes of one index, on a
// link of version 3 and of version 2.
func TestPassOrder(t *testing.T) {
	cases := []struct {
		name    string
		version uint16
		passes  []Pass
		want    error // of the last pass; the ones before succeed
	}{
		{"final", 2, []Pass{PassFinal}, nil},
		{"pre then confirm", 3, []Pass{PassPre, PassConfirm}, nil},
		{"pre then final", 3, []Pass{PassPre, PassFinal}, nil},
		{"pre on version 2", 2, []Pass{PassPre}, ErrMalformed},
		{"confirm without pre", 3, []Pass{PassConfirm}, ErrMalformed},
		{"second pre", 3, []Pass{PassPre, PassPre}, ErrDuplicate},
		{"pre after final", 3, []Pass{PassFinal, PassPre}, ErrDuplicate},
		{"second confirm", 3, []Pass{PassPre, PassConfirm, PassConfirm}, ErrDuplicate},
		{"final after confirm", 3, []Pass{PassPre, PassConfirm, PassFinal}, ErrDuplicate},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := &Link{version: c.version, limits: Limits{MaxConnections: 100}}
			for i, p := range c.passes {
				err := l.admitIndex(70, p)
				if i < len(c.passes)-1 || c.want == nil {
					if err != nil {
						t.Fatalf("pass %d (%s): %v", i, p, err)
					}
					continue
				}
				if !errors.Is(err, c.want) {
					t.Fatalf("pass %d (%s): %v, want %v", i, p, err, c.want)
				}
			}
		})
	}
}

// TestConfirmCarriesNothing: a confirmation that carries a snapshot, and a
// pass this version does not know, are malformed.
func TestConfirmCarriesNothing(t *testing.T) {
	bad := []record{
		{index: 1, pass: PassConfirm, snap: repair.Snapshot{Local: netip.MustParseAddrPort("198.18.0.1:80")}},
		{index: 1, pass: PassConfirm, snap: repair.Snapshot{RecvQueue: []byte("x")}},
		{index: 1, pass: PassConfirm, state: []byte("app")},
		{index: 1, pass: 3},
	}
	for _, r := range bad {
		body := snapshotTable.appendFields(nil, &r)
		if _, err := decodeRecord(body); !errors.Is(err, ErrMalformed) {
			t.Errorf("%+v decoded with %v, want ErrMalformed", r, err)
		}
	}
	ok := record{index: 1, pass: PassConfirm}
	if got, err := decodeRecord(snapshotTable.appendFields(nil, &ok)); err != nil || got.pass != PassConfirm || got.index != 1 {
		t.Errorf("a plain confirmation decoded as %+v, %v", got, err)
	}
}
