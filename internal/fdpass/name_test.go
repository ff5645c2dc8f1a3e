package fdpass

import (
	"errors"
	"net/netip"
	"os"
	"testing"
)

// TestItemName checks the optional name field of a socket record: it
// round-trips, costs nothing when empty (the record is the one older
// revisions write), and a malformed one is refused.
func TestItemName(t *testing.T) {
	items := []Item{
		{ID: 1, Local: netip.MustParseAddrPort("198.18.0.10:80"), Name: "listen4-198.18.0.10_80"},
		{ID: 2, Local: netip.MustParseAddrPort("198.18.0.10:80"), Remote: netip.MustParseAddrPort("198.18.0.1:5000"),
			State: []byte("st"), Name: "pending4-198.18.0.10_80-198.18.0.10_80-198.18.0.1_5000"},
		{ID: 3, Local: netip.MustParseAddrPort("198.18.0.10:80"), Remote: netip.MustParseAddrPort("198.18.0.1:5001")},
	}
	spans := planBatch(items)
	b := appendBatchFrame(nil, KindSockets, items, spans[0], true)
	// Descriptors are not part of the body: the header's nfds is checked
	// against what arrived by the connection, so decode with nfds cleared.
	f, err := decodeFrame(b, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	for i, it := range f.items {
		if it.Name != items[i].Name || it.ID != items[i].ID || string(it.State) != string(items[i].State) {
			t.Errorf("item %d: got %+v, want %+v", i, it, items[i])
		}
	}
	if recordLen(&items[2]) != 8+7+7+4 {
		t.Errorf("unnamed record is %d bytes; the name must cost nothing when empty", recordLen(&items[2]))
	}
	bad := items[:1:1]
	bad[0].Name = "has space"
	if err := checkItem(KindSockets, &Item{File: os.Stdin, Name: "has space"}, Limits{}.resolve()); !errors.Is(err, ErrInvalid) {
		t.Errorf("sending a bad name: %v, want ErrInvalid", err)
	}
	b = appendBatchFrame(nil, KindSockets, bad, planBatch(bad)[0], true)
	if _, err := decodeFrame(b, Limits{}); !errors.Is(err, ErrMalformed) {
		t.Errorf("bad name decoded: %v", err)
	}
}
