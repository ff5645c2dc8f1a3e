package fdpass

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

// TestWireConstants pins every wire constant: a failure here is a protocol
// change, which needs a new Version and an update of docs/handoff-socket.md.
func TestWireConstants(t *testing.T) {
	ints := []struct {
		name      string
		got, want int
	}{
		{"Version", Version, 1},
		{"HeaderLen", HeaderLen, 12},
		{"MaxFDsPerFrame", MaxFDsPerFrame, 253}, // SCM_MAX_FD in include/net/scm.h
		{"MaxBodyLen", MaxBodyLen, 4 << 20},
		{"MaxStateLen", MaxStateLen, 1 << 20},
		{"MaxBatchLimit", MaxBatchLimit, 65536},
		{"helloLen", helloLen, 12},
		{"maxHelloBody", maxHelloBody, 1024},
		{"maxErrorBody", maxErrorBody, 4096},
		{"batchHeaderLen", batchHeaderLen, 4},
		{"flagFinal", flagFinal, 1},
		{"familyNone", familyNone, 0},
		{"family4", family4, 4},
		{"family6", family6, 6},
		{"KindHello", int(KindHello), 1},
		{"KindError", int(KindError), 2},
		{"KindSockets", int(KindSockets), 3},
		{"KindHandBack", int(KindHandBack), 4},
		{"KindCommitted", int(KindCommitted), 5},
		{"KindAck", int(KindAck), 6},
		{"CodeRefused", int(CodeRefused), 1},
		{"CodeMalformed", int(CodeMalformed), 2},
		{"CodeVersion", int(CodeVersion), 3},
		{"CodeTooLarge", int(CodeTooLarge), 4},
		{"CodeFDCount", int(CodeFDCount), 5},
		{"CodeNotTCP", int(CodeNotTCP), 6},
		{"CodeUnexpected", int(CodeUnexpected), 7},
		{"CodeRejected", int(CodeRejected), 8},
	}
	for _, c := range ints {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
	if Magic != "TMFD" {
		t.Errorf("Magic = %q", Magic)
	}
}

// TestGoldenFrames pins the exact bytes of the examples in
// docs/handoff-socket.md.
func TestGoldenFrames(t *testing.T) {
	items := []Item{{
		ID:     7,
		Local:  netip.MustParseAddrPort("198.18.0.10:80"),
		Remote: netip.MustParseAddrPort("[fd00::1%eth0]:5000"),
		State:  []byte("hi"),
	}}
	golden := []struct {
		name string
		got  []byte
		want string
	}{
		{"hello", appendHello(nil, Limits{}.resolve()),
			"544d4644 01 01 0000 0000000c  00100000 00001000 04000000"},
		{"error", appendError(nil, CodeRefused, "no"),
			"544d4644 01 02 0000 00000004  0001 6e6f"},
		{"committed", appendIDs(nil, KindCommitted, []uint64{1, 2}),
			"544d4644 01 05 0000 00000014  00000002 0000000000000001 0000000000000002"},
		{"sockets", appendBatchFrame(nil, KindSockets, items, planBatch(items)[0], true),
			"544d4644 01 03 0001 00000035  0001 01 00" +
				" 0000002d 0000000000000007" +
				" 04 c612000a 0050" +
				" 06 fd000000000000000000000000000001 1388 04 65746830" +
				" 00000002 6869"},
	}
	for _, g := range golden {
		want, err := hex.DecodeString(strings.ReplaceAll(g.want, " ", ""))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(g.got, want) {
			t.Errorf("%s frame:\n got %x\nwant %x", g.name, g.got, want)
		}
	}
}

func TestFrameRoundTrip(t *testing.T) {
	items := []Item{
		{ID: 1, Local: netip.MustParseAddrPort("198.18.0.10:80"), Remote: netip.MustParseAddrPort("198.18.0.1:5000"), State: []byte("state")},
		{ID: 2, Local: netip.MustParseAddrPort("[fd00::10]:443"), Remote: netip.MustParseAddrPort("[fd00::1]:40000")},
		{ID: 3, Local: netip.MustParseAddrPort("[::ffff:198.18.0.10]:80"), Remote: netip.MustParseAddrPort("[fe80::1%veth-a.1]:1")},
		{ID: 1 << 63}, // no addresses, no state
	}
	frames := map[string][]byte{
		"hello":     appendHello(nil, Limits{MaxState: 5, MaxBatch: 6, MaxBatchBytes: 7}),
		"error":     appendError(nil, CodeTooLarge, "too big: ünïcode"),
		"sockets":   appendBatchFrame(nil, KindSockets, items, planBatch(items)[0], true),
		"hand-back": appendBatchFrame(nil, KindHandBack, items, planBatch(items)[0], false),
		"committed": appendIDs(nil, KindCommitted, []uint64{9, 8, 7}),
		"ack":       appendIDs(nil, KindAck, nil),
	}
	for name, b := range frames {
		f, err := decodeFrame(b, Limits{})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if f.kind.String() != name {
			t.Errorf("%s: decoded kind %v", name, f.kind)
		}
		switch f.kind {
		case KindHello:
			if f.limits != (Limits{MaxState: 5, MaxBatch: 6, MaxBatchBytes: 7}) {
				t.Errorf("hello limits %+v", f.limits)
			}
		case KindError:
			if f.code != CodeTooLarge || f.msg != "too big: ünïcode" {
				t.Errorf("error %v %q", f.code, f.msg)
			}
		case KindSockets, KindHandBack:
			if f.nfds != len(items) || f.final != (f.kind == KindSockets) {
				t.Errorf("%s: nfds %d final %v", name, f.nfds, f.final)
			}
			if !reflect.DeepEqual(f.items, items) {
				t.Errorf("%s: items\n got %+v\nwant %+v", name, f.items, items)
			}
		case KindCommitted:
			if !reflect.DeepEqual(f.ids, []uint64{9, 8, 7}) {
				t.Errorf("committed %v", f.ids)
			}
		case KindAck:
			if len(f.ids) != 0 {
				t.Errorf("ack %v", f.ids)
			}
		}
	}
}

// TestDecodeRejects feeds the decoder broken frames; each must fail with
// the right sentinel and a message that names the problem.
func TestDecodeRejects(t *testing.T) {
	one := []Item{{ID: 1, Local: netip.MustParseAddrPort("198.18.0.10:80"), State: []byte("abc")}}
	good := appendBatchFrame(nil, KindSockets, one, planBatch(one)[0], true)
	two := []Item{{ID: 1}, {ID: 2}}
	twoFrame := appendBatchFrame(nil, KindSockets, two, planBatch(two)[0], true)
	patch := func(b []byte, off int, v ...byte) []byte {
		b = bytes.Clone(b)
		copy(b[off:], v)
		return b
	}
	bigState := func(n uint32) []byte {
		b := bytes.Clone(good)
		binary.BigEndian.PutUint32(b[len(b)-7:], n) // the state length field
		return b
	}
	cases := []struct {
		name string
		b    []byte
		lim  Limits
		want error
		text string
	}{
		{"short header", []byte("TMFD\x01"), Limits{}, ErrMalformed, "5-byte header"},
		{"garbage", []byte("GET / HTTP/1.1\r\n\r\n"), Limits{}, ErrMalformed, "bad magic"},
		{"version 2", patch(good, 4, 2), Limits{}, ErrVersion, "version 2"},
		{"version 0", patch(good, 4, 0), Limits{}, ErrVersion, "version 0"},
		{"unknown type", patch(good, 5, 99), Limits{}, ErrMalformed, "unknown message type 99"},
		{"type zero", patch(good, 5, 0), Limits{}, ErrMalformed, "unknown message type 0"},
		{"too many fds", patch(good, 6, 0, 254), Limits{}, ErrMalformed, "254 descriptors"},
		{"fds on ack", patch(appendIDs(nil, KindAck, nil), 6, 0, 1), Limits{}, ErrMalformed, "carries none"},
		{"body too large", patch(good, 8, 0x00, 0x40, 0x00, 0x01), Limits{}, ErrTooLarge, "4194305 bytes"},
		{"hello too large", patch(appendHello(nil, Limits{}), 8, 0, 0, 4, 1), Limits{}, ErrTooLarge, "hello frame body of 1025"},
		{"hello too short", patch(appendHello(nil, Limits{}), 8, 0, 0, 0, 11)[:HeaderLen+11], Limits{}, ErrMalformed, "at least 12"},
		{"body shorter than header says", good[:len(good)-1], Limits{}, ErrMalformed, "header says"},
		{"trailing bytes", append(bytes.Clone(good), 0), Limits{}, ErrMalformed, "header says"},
		{"count differs from fds", patch(good, HeaderLen, 0, 2), Limits{}, ErrMalformed, "names 2 sockets"},
		{"unknown flag", patch(good, HeaderLen+2, 5), Limits{}, ErrMalformed, "unknown flags"},
		{"paused with descriptors", patch(appendBatchFrame(nil, KindPaused, []Item{{ID: 1}}, planBatch([]Item{{ID: 1}})[0], true), 6, 0, 1), Limits{}, ErrMalformed, "carries none"},
		{"paused frame of 254", patch(appendBatchFrame(nil, KindPaused, nil, span{bodyLen: batchHeaderLen}, true), HeaderLen, 0, 254), Limits{MaxBatch: MaxBatchLimit}, ErrMalformed, "254 records, at most 253"},
		{"paused count past body", patch(appendBatchFrame(nil, KindPaused, nil, span{bodyLen: batchHeaderLen}, true), HeaderLen, 0, 200), Limits{}, ErrMalformed, "room for at most 0"},
		{"live hand-back", patch(patch(good, 5, byte(KindHandBack)), HeaderLen+2, flagFinal|flagLive), Limits{}, ErrMalformed, "unknown flags"},
		{"reserved byte", patch(good, HeaderLen+3, 1), Limits{}, ErrMalformed, "unknown flags"},
		{"record past end", patch(good, HeaderLen+4, 0, 0, 1, 0), Limits{}, ErrMalformed, "record claims 256 bytes"},
		{"bad family", patch(good, HeaderLen+4+4+8, 5), Limits{}, ErrMalformed, "socket 0: unknown local address family 5"},
		{"state over limit", bigState(4), Limits{MaxState: 3}, ErrTooLarge, "4 bytes, at most 3"},
		{"state claims 2 MiB", bigState(2 << 20), Limits{}, ErrTooLarge, "2097152 bytes"},
		{"state past record", bigState(4), Limits{}, ErrMalformed, "3 left in the record"},
		{"batch over limit", twoFrame, Limits{MaxBatch: 1}, ErrTooLarge, "2 sockets, at most 1"},
		{"id list length", patch(appendIDs(nil, KindAck, []uint64{1}), HeaderLen, 0, 0, 0, 2), Limits{}, ErrMalformed, "2 IDs needs"},
		{"id list over limit", appendIDs(nil, KindAck, []uint64{1, 2, 3}), Limits{MaxBatch: 2}, ErrTooLarge, "3 IDs"},
	}
	for _, c := range cases {
		lim := c.lim.resolve()
		h, err := parseHeader(c.b)
		if err == nil {
			if len(c.b)-HeaderLen != h.bodyLen {
				_, err = decodeFrame(c.b, lim)
			} else {
				_, err = decodeBody(h, c.b[HeaderLen:], lim)
			}
		}
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("%s: got %v, want %v containing %q", c.name, err, c.want, c.text)
		}
	}
}

func TestPlanBatch(t *testing.T) {
	items := make([]Item, 300)
	spans := planBatch(items)
	if len(spans) != 2 || spans[0] != (span{0, 253, 4 + 253*(4+8+1+1+4)}) || spans[1].start != 253 || spans[1].end != 300 {
		t.Fatalf("300 sockets planned as %+v", spans)
	}
	if s := planBatch(nil); len(s) != 1 || s[0].end != 0 {
		t.Errorf("empty batch planned as %+v", s)
	}
	// Five 1 MiB states: three fit in a 4 MiB frame, four do not.
	big := make([]Item, 5)
	for i := range big {
		big[i].State = make([]byte, MaxStateLen)
	}
	spans = planBatch(big)
	if len(spans) != 2 || spans[0].end != 3 || spans[1].end != 5 {
		t.Fatalf("five 1 MiB states planned as %+v", spans)
	}
	for _, s := range spans {
		if s.bodyLen > MaxBodyLen {
			t.Errorf("span %+v over MaxBodyLen", s)
		}
		b := appendBatchFrame(nil, KindSockets, big, s, false)
		if len(b) != HeaderLen+s.bodyLen {
			t.Errorf("span %+v encoded as %d bytes", s, len(b))
		}
	}
}

func TestErrorText(t *testing.T) {
	err := error(&OpError{Op: "receive", Err: ErrMalformed})
	if got := err.Error(); got != "fdpass: receive: malformed frame" {
		t.Errorf("OpError text %q", got)
	}
	re := &RemoteError{Code: CodeRefused, Message: "uid 65534"}
	if !errors.Is(re, ErrRefused) || errors.Is(re, ErrMalformed) {
		t.Error("RemoteError does not match its code's sentinel only")
	}
	if codeOf(&PeerError{}) != CodeRefused || codeOf(errors.New("x")) != CodeRejected {
		t.Error("codeOf")
	}
	if (&RemoteError{Code: 99}).Is(ErrRejected) || ErrorCode(99).String() != "code(99)" {
		t.Error("unknown code")
	}
	if got := sanitize("a\x1b[31mb\xff"); got != "a?[31mb?" {
		t.Errorf("sanitize %q", got)
	}
	if got := truncateUTF8("aé", 2); got != "a" {
		t.Errorf("truncateUTF8 %q", got)
	}
}
