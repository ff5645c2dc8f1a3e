package journal

import (
	"net/netip"
	"os"
	"path/filepath"
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
