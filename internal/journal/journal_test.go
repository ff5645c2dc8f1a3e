package journal

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestUpdateKeepsTheConnectionList(t *testing.T) {
	jr, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := &Record{Migration: "m1", Role: Source, State: "locked", Conns: []Conn{
		{Index: 0, Local: netip.MustParseAddrPort("198.18.0.10:80"), Remote: netip.MustParseAddrPort("198.18.0.1:4000"), FD: 7},
		{Index: 1, Local: netip.MustParseAddrPort("198.18.0.10:80"), Remote: netip.MustParseAddrPort("198.18.0.1:4001"), FD: 8},
	}}
	if err := jr.Write(r); err != nil {
		t.Fatal(err)
	}
	// A state change rewrites the record only, even without the list.
	up := *r
	up.Conns, up.State = nil, "switched"
	up.Released = []netip.Prefix{netip.MustParsePrefix("198.18.0.10/24")}
	if err := jr.Update(&up); err != nil {
		t.Fatal(err)
	}
	got, err := jr.Read(Source, "m1")
	if err != nil {
		t.Fatal(err)
	}
	if got.State != "switched" || len(got.Released) != 1 || len(got.Conns) != 2 || got.Conns[1].FD != 8 || got.Conns[1].Remote != r.Conns[1].Remote {
		t.Fatalf("read back %+v", got)
	}
	list, err := jr.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || len(list[0].Conns) != 2 {
		t.Fatalf("List: %d records (want 1, with its 2 connections): %+v", len(list), list)
	}
	if err := jr.Remove(r); err != nil {
		t.Fatal(err)
	}
	left, _ := filepath.Glob(filepath.Join(jr.Dir(), "*"))
	if len(left) != 0 {
		t.Fatalf("files left after Remove: %v", left)
	}
}

func TestRecordWithoutConnections(t *testing.T) {
	jr, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := &Record{Migration: "m2", Role: Target, State: "preparing"}
	if err := jr.Update(r); err != nil {
		t.Fatal(err)
	}
	r.State = "committed"
	if err := jr.Write(r); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(jr.Dir(), "target-m2.conns")); !os.IsNotExist(err) {
		t.Fatalf("a record without connections wrote a list: %v", err)
	}
	got, err := jr.Read(Target, "m2")
	if err != nil || got.State != "committed" || got.Conns != nil {
		t.Fatalf("read back %+v, %v", got, err)
	}
}

func TestUpdateInPlaceShorterAndLonger(t *testing.T) {
	jr, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := &Record{Migration: "m3", Role: Target, State: "preparing", Peer: "198.18.0.2:50000"}
	if err := jr.Update(r); err != nil { // no record yet: a new file
		t.Fatal(err)
	}
	for _, st := range []string{"committed", "a", "a-much-longer-state-than-any-before-it"} {
		r.State = st
		if err := jr.Update(r); err != nil {
			t.Fatal(err)
		}
		got, err := jr.Read(Target, "m3")
		if err != nil || got.State != st || got.Peer != r.Peer {
			t.Fatalf("after Update to %q: %+v, %v", st, got, err)
		}
	}
}

// TestListSkipsBadRecords puts an undecodable record and a record whose
// connection list is undecodable between good ones: List returns every
// good record and an error that matches ErrBadRecord and names both bad
// files, where it used to stop at the first bad one.
func TestListSkipsBadRecords(t *testing.T) {
	jr, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	good := map[string]bool{}
	for _, m := range []string{"a1", "c1", "e1"} {
		if err := jr.Update(&Record{Migration: m, Role: Target, State: "committed"}); err != nil {
			t.Fatal(err)
		}
		good[m] = true
	}
	// b1 sorts between a1 and c1: a torn record.
	if err := os.WriteFile(filepath.Join(jr.Dir(), "target-b1.json"), []byte(`{"migration": "b1", "ro`), 0o600); err != nil {
		t.Fatal(err)
	}
	// d1: a good record with a bad connection list.
	if err := jr.Write(&Record{Migration: "d1", Role: Source, State: "locked", Conns: []Conn{{Index: 0}}}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(jr.Dir(), "source-d1.conns"), []byte("[{"), 0o600); err != nil {
		t.Fatal(err)
	}
	list, err := jr.List()
	if !errors.Is(err, ErrBadRecord) {
		t.Fatalf("List error = %v, want one matching ErrBadRecord", err)
	}
	for _, name := range []string{"target-b1.json", "source-d1.conns"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("List error does not name %s: %v", name, err)
		}
	}
	for _, r := range list {
		if !good[r.Migration] {
			t.Errorf("List returned %s", r.Migration)
		}
		delete(good, r.Migration)
	}
	if len(good) != 0 {
		t.Fatalf("List left out good records %v (returned %d)", good, len(list))
	}
}
