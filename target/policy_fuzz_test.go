package target

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// The fuzz target runs alone:
//
//	go test -run '^$' -fuzz '^FuzzPolicy$' -fuzztime 10s ./target/
//
// Its seed corpus is in testdata/fuzz/FuzzPolicy/, written from
// fuzzSeeds by TestWriteFuzzSeeds (TARGET_WRITE_FUZZ_SEEDS=1).

// fuzzReader reads the fields of a snapshot from fuzz input; past the end
// of the input every field reads as zero.
type fuzzReader struct{ b []byte }

func (r *fuzzReader) bytes(n int) []byte {
	n = min(n, len(r.b))
	p := r.b[:n]
	r.b = r.b[n:]
	return p
}

func (r *fuzzReader) u8() uint8 {
	if p := r.bytes(1); len(p) == 1 {
		return p[0]
	}
	return 0
}

func (r *fuzzReader) u16() uint16 { return uint16(r.u8())<<8 | uint16(r.u8()) }

func (r *fuzzReader) u32() uint32 { return uint32(r.u16())<<16 | uint32(r.u16()) }

// addrPort reads a selector (0: none, 1: IPv4, 2: IPv6, 3: IPv6 and a zone),
// the address, the port and the zone.
func (r *fuzzReader) addrPort() netip.AddrPort {
	var a netip.Addr
	switch r.u8() % 4 {
	case 1:
		var b [4]byte
		copy(b[:], r.bytes(4))
		a = netip.AddrFrom4(b)
	case 2, 3:
		var b [16]byte
		copy(b[:], r.bytes(16))
		a = netip.AddrFrom16(b)
	}
	port := r.u16()
	if z := r.bytes(int(r.u8() % 32)); len(z) > 0 && a.Is6() {
		a = a.WithZone(string(z))
	}
	return netip.AddrPortFrom(a, port)
}

// decodeFuzz decodes a snapshot and an application state from fuzz input.
func decodeFuzz(b []byte) (*repair.Snapshot, []byte, repair.Features) {
	r := &fuzzReader{b: b}
	s := &repair.Snapshot{}
	have := repair.Features(r.u16())
	s.Family = r.u16()
	s.State = repair.State(r.u8())
	s.Flags = repair.Flags(r.u32())
	s.Shutdown = repair.Shutdown(r.u8())
	s.SndWScale, s.RcvWScale = r.u8(), r.u8()
	s.MSSClamp, s.Timestamp = r.u32(), r.u32()
	s.SendSeq, s.RecvSeq = r.u32(), r.u32()
	s.Window = repair.Window{SndWl1: r.u32(), SndWnd: r.u32(), MaxWindow: r.u32(), RcvWnd: r.u32(), RcvWup: r.u32()}
	s.Unsent = r.u32()
	s.Options.Mask = repair.OptMask(r.u32())
	s.Options.Mark = r.u32()
	s.Options.KeepIdle, s.Options.KeepIntvl = int32(r.u32()), int32(r.u32())
	s.Options.KeepCnt, s.Options.TTL = int32(r.u32()), int32(r.u32())
	s.Local, s.Remote = r.addrPort(), r.addrPort()
	s.RecvQueue = slices.Clone(r.bytes(int(r.u16())))
	s.SendQueue = slices.Clone(r.bytes(int(r.u16())))
	state := slices.Clone(r.bytes(int(r.u16())))
	return s, state, have
}

// encodeFuzz is decodeFuzz's inverse, for the seeds.
func encodeFuzz(s *repair.Snapshot, state []byte, have repair.Features) []byte {
	be := binary.BigEndian
	b := be.AppendUint16(nil, uint16(have))
	b = be.AppendUint16(b, s.Family)
	b = append(b, byte(s.State))
	b = be.AppendUint32(b, uint32(s.Flags))
	b = append(b, byte(s.Shutdown), s.SndWScale, s.RcvWScale)
	for _, v := range []uint32{s.MSSClamp, s.Timestamp, s.SendSeq, s.RecvSeq, s.Window.SndWl1, s.Window.SndWnd,
		s.Window.MaxWindow, s.Window.RcvWnd, s.Window.RcvWup, s.Unsent, uint32(s.Options.Mask), s.Options.Mark,
		uint32(s.Options.KeepIdle), uint32(s.Options.KeepIntvl), uint32(s.Options.KeepCnt), uint32(s.Options.TTL)} {
		b = be.AppendUint32(b, v)
	}
	for _, ap := range []netip.AddrPort{s.Local, s.Remote} {
		a := ap.Addr()
		switch {
		case !a.IsValid():
			b = append(b, 0)
		case a.Is4():
			b = append(b, 1)
			b = append(b, a.AsSlice()...)
		case a.Zone() != "":
			b = append(b, 3)
			b = append(b, a.AsSlice()...)
		default:
			b = append(b, 2)
			b = append(b, a.AsSlice()...)
		}
		b = be.AppendUint16(b, ap.Port())
		b = append(b, byte(len(a.Zone())))
		b = append(b, a.Zone()...)
	}
	for _, q := range [][]byte{s.RecvQueue, s.SendQueue, state} {
		b = be.AppendUint16(b, uint16(len(q)))
		b = append(b, q...)
	}
	return b
}

// fuzzSeeds are snapshots the policy accepts and ones it refuses for each
// reason, encoded for FuzzPolicy.
func fuzzSeeds() [][]byte {
	good := goodSnapshot()
	v6 := goodSnapshot()
	v6.Family = unix.AF_INET6
	v6.Local, v6.Remote = netip.MustParseAddrPort("[fd00::10]:8080"), netip.MustParseAddrPort("[fd00::1]:40000")
	ll := goodSnapshot()
	ll.Family = unix.AF_INET6
	ll.Local, ll.Remote = netip.MustParseAddrPort("[fe80::10%eth0]:8080"), netip.MustParseAddrPort("[fe80::1%eth0]:40000")
	outside := goodSnapshot()
	outside.Local = netip.MustParseAddrPort("198.18.0.3:8080")
	unsent := goodSnapshot()
	unsent.Unsent = 100
	window := goodSnapshot()
	window.SndWScale, window.Window.SndWnd, window.Window.MaxWindow = 0, 70000, 70000
	usec := goodSnapshot()
	usec.Flags |= repair.FlagUsecTS
	return [][]byte{
		encodeFuzz(good, nil, allFeatures),
		encodeFuzz(good, []byte("application state"), allFeatures),
		encodeFuzz(v6, nil, allFeatures),
		encodeFuzz(ll, nil, allFeatures),
		encodeFuzz(outside, nil, allFeatures),
		encodeFuzz(unsent, nil, allFeatures),
		encodeFuzz(window, nil, allFeatures),
		encodeFuzz(usec, nil, allFeatures&^repair.FeatUsecTS),
		{},
	}
}

// FuzzPolicy feeds decoded snapshots through the policy (Check, then the
// per-migration admission) and checks that nothing panics and that
// whatever is accepted passes repair's Validate and this package's
// consistency checks, lies within the allow-lists and the limits.
func FuzzPolicy(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	pol := testPolicy().withDefaults()
	f.Fuzz(func(t *testing.T, b []byte) {
		s, state, have := decodeFuzz(b)
		err := pol.check(s, state, have)
		a := newAdmission(&pol, have)
		if aerr := a.admit(0, s, state); (aerr == nil) != (err == nil) {
			t.Fatalf("Check says %v, admit says %v", err, aerr)
		}
		if err != nil {
			if verdictOf(err) == 0 || err.Error() == "" {
				t.Fatalf("refusal without a verdict or a reason: %#v", err)
			}
			return
		}
		if verr := s.Validate(); verr != nil {
			t.Fatalf("accepted a snapshot Validate refuses: %v", verr)
		}
		if cerr := consistent(s); cerr != nil {
			t.Fatalf("accepted an inconsistent snapshot: %v", cerr)
		}
		local, _ := s.Tuple()
		if !pol.allowedAddr(local.Addr()) || !slices.Contains(pol.AllowPorts, local.Port()) {
			t.Fatalf("accepted %s, outside the allow-lists", local)
		}
		if queueBytes(s, state) > pol.MaxQueueBytes {
			t.Fatalf("accepted %d bytes over the limit", queueBytes(s, state))
		}
		if have != 0 && needs(s)&^have != 0 {
			t.Fatalf("accepted a snapshot needing %s on a kernel with %s", needs(s), have)
		}
	})
}

// TestFuzzSeeds checks that the seed encoding round-trips and that the
// seeds reach both sides of the policy (so the fuzzer starts from inputs
// that are accepted as well as refused).
func TestFuzzSeeds(t *testing.T) {
	pol := testPolicy().withDefaults()
	accepted, refused := 0, 0
	for i, b := range fuzzSeeds() {
		s, state, have := decodeFuzz(b)
		if got := encodeFuzz(s, state, have); len(b) > 0 && !slices.Equal(got, b) {
			t.Errorf("seed %d does not round-trip", i)
		}
		if pol.check(s, state, have) == nil {
			accepted++
		} else {
			refused++
		}
	}
	if accepted < 3 || refused < 4 {
		t.Errorf("%d seeds accepted and %d refused, want at least 3 and 4", accepted, refused)
	}
}

// TestWriteFuzzSeeds writes the seed corpus of FuzzPolicy into
// testdata/fuzz/FuzzPolicy when TARGET_WRITE_FUZZ_SEEDS=1.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("TARGET_WRITE_FUZZ_SEEDS") != "1" {
		t.Skip("set TARGET_WRITE_FUZZ_SEEDS=1 to rewrite testdata/fuzz/FuzzPolicy")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzPolicy")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, b := range fuzzSeeds() {
		content := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
