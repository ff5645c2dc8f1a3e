package fdpass

import (
	"errors"
	"net/netip"
	"reflect"
	"testing"
)

// encodeFrame re-encodes a decoded frame, for the fuzz target's round trip.
func encodeFrame(f frame) []byte {
	switch f.kind {
	case KindHello:
		return appendHello(nil, f.limits)
	case KindError:
		return appendError(nil, f.code, f.msg)
	case KindSockets, KindHandBack, KindPaused:
		s := span{end: len(f.items), bodyLen: batchHeaderLen}
		for i := range f.items {
			s.bodyLen += 4 + recordLen(&f.items[i])
		}
		return appendBatchFrameFlags(nil, f.kind, f.items, s, f.final, f.live)
	default:
		return appendIDs(nil, f.kind, f.ids)
	}
}

// FuzzDecodeFrame checks that the frame decoder never panics, classifies
// every failure as one of its sentinel errors, and that whatever it accepts
// encodes back to a frame that decodes to the same value.
func FuzzDecodeFrame(f *testing.F) {
	items := []Item{
		{ID: 1, Local: netip.MustParseAddrPort("198.18.0.10:80"), Remote: netip.MustParseAddrPort("198.18.0.1:5000"), State: []byte("state"),
			Name: "pending4-198.18.0.10_80-198.18.0.10_80-198.18.0.1_5000"},
		{ID: 2, Local: netip.MustParseAddrPort("[fd00::10]:443"), Remote: netip.MustParseAddrPort("[fe80::1%eth0]:1")},
	}
	f.Add(appendHello(nil, Limits{}.resolve()))
	f.Add(appendError(nil, CodeRefused, "uid 65534 may not connect"))
	f.Add(appendBatchFrame(nil, KindSockets, items, planBatch(items)[0], true))
	f.Add(appendBatchFrame(nil, KindHandBack, items[:1], planBatch(items[:1])[0], false))
	f.Add(appendIDs(nil, KindCommitted, []uint64{1, 2, 3}))
	f.Add(appendIDs(nil, KindAck, nil))
	f.Add(appendBatchFrameFlags(nil, KindSockets, items, planBatch(items)[0], false, true))
	f.Add(appendIDs(nil, KindPause, []uint64{7}))
	paused := []Item{{ID: 7, State: []byte("offsets")}, {ID: 8}}
	f.Add(appendBatchFrame(nil, KindPaused, paused, planBatch(paused)[0], true))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		lim := Limits{MaxState: 64 << 10, MaxBatch: 64}
		fr, err := decodeFrame(b, lim)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrVersion) && !errors.Is(err, ErrTooLarge) {
				t.Fatalf("unclassified decode error: %v", err)
			}
			return
		}
		switch fr.kind {
		case KindPaused: // records without descriptors, split as SOCKETS
			if fr.nfds != 0 || len(fr.items) > MaxFDsPerFrame {
				t.Fatalf("decoded a paused frame of %d records with %d descriptors", len(fr.items), fr.nfds)
			}
		default:
			if len(fr.items) != fr.nfds {
				t.Fatalf("decoded %d items for %d descriptors", len(fr.items), fr.nfds)
			}
		}
		again, err := decodeFrame(encodeFrame(fr), lim)
		if err != nil {
			t.Fatalf("re-encoded frame does not decode: %v", err)
		}
		if !reflect.DeepEqual(fr, again) {
			t.Fatalf("round trip changed the frame:\n%+v\n%+v", fr, again)
		}
	})
}
