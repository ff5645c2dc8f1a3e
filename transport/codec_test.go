package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	mrand "math/rand/v2"
	"net/netip"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

func encodeSnapshot(index uint32, s *repair.Snapshot) []byte {
	return appendSnapshotFrame(nil, index, s)
}

// decodeFrame decodes one whole snapshot frame.
func decodeFrame(t testing.TB, b []byte) (uint32, *repair.Snapshot) {
	t.Helper()
	if len(b) < frameHeaderSize || MsgType(b[4]) != MsgSnapshot || int(binary.BigEndian.Uint32(b)) != len(b)-4 {
		t.Fatalf("bad frame header % x", b[:min(len(b), 5)])
	}
	i, s, err := decodeSnapshot(b[5:])
	if err != nil {
		t.Fatal(err)
	}
	return i, s
}

func TestSnapshotRoundTrip(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(1, 2))
	for _, size := range []int{0, 1, 100, 64 << 10, 1 << 20} {
		s := randSnapshot(rng, size, size/2)
		i, got := decodeFrame(t, encodeSnapshot(uint32(size), s))
		if i != uint32(size) {
			t.Errorf("index %d, want %d", i, size)
		}
		if !reflect.DeepEqual(got, s) {
			t.Errorf("size %d: round trip differs:\n got %+v\nwant %+v", size, got, s)
		}
	}
	// The zero snapshot encodes to nothing and decodes to itself.
	b := encodeSnapshot(0, &repair.Snapshot{})
	if len(b) != frameHeaderSize {
		t.Errorf("zero snapshot encodes to %d bytes, want the bare header", len(b))
	}
	if _, got := decodeFrame(t, b); !reflect.DeepEqual(got, &repair.Snapshot{}) {
		t.Errorf("zero snapshot decodes to %+v", got)
	}
}

// TestSnapshotEveryField sets each field of repair.Snapshot, alone, and
// checks that it survives the codec. A field added to repair.Snapshot and
// not to snapshotTable fails here.
func TestSnapshotEveryField(t *testing.T) {
	n := 0
	var walk func(path string, typ reflect.Type)
	walk = func(path string, typ reflect.Type) {
		if typ.Kind() == reflect.Struct && typ != reflect.TypeOf(netip.AddrPort{}) {
			for i := 0; i < typ.NumField(); i++ {
				walk(path+"."+typ.Field(i).Name, typ.Field(i).Type)
			}
			return
		}
		n++
		t.Run(strings.TrimPrefix(path, "."), func(t *testing.T) {
			var s repair.Snapshot
			setNonZero(t, reflect.ValueOf(&s).Elem().FieldByIndex(fieldIndex(t, path)))
			switch path {
			case ".Unsent":
				s.SendQueue, s.Unsent = []byte{1, 2, 3}, 3
			case ".SendQueue":
				s.Unsent = 1
			}
			_, got := decodeFrame(t, encodeSnapshot(7, &s))
			if !reflect.DeepEqual(got, &s) {
				t.Errorf("field %s lost in the round trip:\n got %+v\nwant %+v", path, got, &s)
			}
		})
	}
	walk("", reflect.TypeOf(repair.Snapshot{}))
	if n < 40 {
		t.Errorf("walked only %d fields", n)
	}
}

func fieldIndex(t *testing.T, path string) []int {
	typ := reflect.TypeOf(repair.Snapshot{})
	var idx []int
	for _, name := range strings.Split(strings.TrimPrefix(path, "."), ".") {
		f, ok := typ.FieldByName(name)
		if !ok {
			t.Fatalf("no field %s", name)
		}
		idx = append(idx, f.Index...)
		typ = f.Type
	}
	return idx
}

func setNonZero(t *testing.T, f reflect.Value) {
	switch f.Kind() {
	case reflect.Bool:
		f.SetBool(true)
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		f.SetUint(1<<(f.Type().Bits()-1) | 1)
	case reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		f.SetInt(-1 << (f.Type().Bits() - 1))
	case reflect.String:
		f.SetString("x-value")
	case reflect.Slice:
		f.SetBytes([]byte{1, 2, 3})
	case reflect.Struct:
		f.Set(reflect.ValueOf(netip.MustParseAddrPort("[2001:db8::1%veth0]:65535")))
	default:
		t.Fatalf("no test value for kind %s", f.Kind())
	}
}

func TestSnapshotAddresses(t *testing.T) {
	for _, ap := range []string{"198.18.0.1:1", "[::ffff:198.18.0.1]:80", "[fd00::1]:65535", "[fe80::1%eth0]:22", "0.0.0.0:0"} {
		s := &repair.Snapshot{Local: netip.MustParseAddrPort(ap), Remote: netip.MustParseAddrPort(ap)}
		_, got := decodeFrame(t, encodeSnapshot(1, s))
		if got.Local != s.Local || got.Remote != s.Remote {
			t.Errorf("%s: got %v %v", ap, got.Local, got.Remote)
		}
	}
}

// TestSnapshotSkipsUnknownFields is forward compatibility: a newer sender's
// fields, in the record, inside Options, and a longer window, are skipped.
func TestSnapshotSkipsUnknownFields(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(3, 4))
	s := randSnapshot(rng, 10, 10)
	body := appendSnapshot(nil, 9, s)
	// An unknown field with a two-byte tag, and one with a long value.
	body = appendHeader(body, 300, 3)
	body = append(body, 1, 2, 3)
	body = appendHeader(body, 99, 200)
	body = append(body, make([]byte, 200)...)
	// Options again, with an unknown field inside: options fields merge.
	body = appendHeader(body, 18, 4)
	body = append(body, 77, 2, 0xff, 0xff)
	// A window of a future, longer struct tcp_repair_window.
	w := appendHeader(nil, 14, 24)
	for _, x := range []uint32{1, 2, 3, 4, 5, 6} {
		w = binary.BigEndian.AppendUint32(w, x)
	}
	body = append(body, w...)
	i, got, err := decodeSnapshot(body)
	if err != nil {
		t.Fatal(err)
	}
	want := *s
	want.Window = repair.Window{SndWl1: 1, SndWnd: 2, MaxWindow: 3, RcvWnd: 4, RcvWup: 5}
	if i != 9 || !reflect.DeepEqual(got, &want) {
		t.Errorf("got %d %+v\nwant %+v", i, got, &want)
	}
}

func TestMessagesRoundTrip(t *testing.T) {
	id := NewMigrationID()
	vs := []Verdict{{Index: 0, Code: VerdictOK}, {Index: 1 << 31, Code: VerdictRefused, Reason: "port 22 not allowed"},
		{Index: 7, Code: VerdictCode(200), Reason: "a code from the future"}}
	for _, m := range allMessages(id, vs) {
		t.Run(m.Type().String(), func(t *testing.T) {
			b := appendFrame(nil, m)
			p := msgTable[m.Type()].phase
			got, err := readMessage(bytes.NewReader(b), p, 1<<20, "frame size", nil)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, m) {
				t.Errorf("got %#v\nwant %#v", got, m)
			}
		})
	}
}

// allMessages returns one of every message, with every field set.
func allMessages(id MigrationID, vs []Verdict) []Message {
	return []Message{
		&Hello{Features: repair.FeatRepair | repair.FeatRepairWindow | repair.FeatMark, Kernel: "6.18.0",
			Congestion: []string{"cubic", "bbr"}, Codecs: 3, Limits: DefaultLimits(), Software: "tcpmigrate test"},
		&Accept{},
		&Reject{Code: RejectFeature, Reason: "no repair-window"},
		&streamOpen{Kind: StreamSnapshots, Codec: CodecZstd},
		&Prepare{Migration: id, Count: 10000, Lease: 30 * time.Second, Tuples: []Tuple{
			{Local: netip.MustParseAddrPort("198.18.0.10:8080"), Remote: netip.MustParseAddrPort("198.18.0.1:40000"), Preset: 2},
			{Local: netip.MustParseAddrPort("[fd00::10]:443"), Remote: netip.MustParseAddrPort("[fd00::1]:50000")}},
			Presets: []repair.Options{{NoDelay: true, KeepAlive: true, KeepIdle: 15, KeepIntvl: 15, KeepCnt: 9},
				{OOBInline: true, UserTimeout: 30000, NotSentLowat: 16384}}},
		&Ready{Migration: id},
		&Precopied{Migration: id, Count: 9999},
		&PrecopyDone{Migration: id, Count: 9998},
		&Verdicts{Migration: id, Verdicts: vs},
		&Prepared{Migration: id, Count: 3, OK: 1},
		&Switch{Migration: id, Addrs: []netip.Prefix{netip.MustParsePrefix("198.18.0.10/24"), netip.MustParsePrefix("fd00::10/64")}},
		&Switched{Migration: id},
		&Commit{Migration: id, Exclude: []uint32{1, 300, 1<<32 - 1}},
		&Committed{Migration: id, Failed: vs[1:]},
		&Abort{Migration: id, Code: AbortTimeout, Reason: "no PREPARED within 30s"},
		&Query{Migration: id},
		&Outcome{Migration: id, State: StateCommitted, Verdicts: vs[1:]},
		&endRecord{Count: 12},
		exampleListeners(id),
		&ListenersReady{Migration: id, Verdicts: vs},
	}
}

func TestMessageAncillaryAndUnknownTypes(t *testing.T) {
	var b []byte
	// An ancillary frame of a type this version does not know, then a Query.
	b = append(b, 0, 0, 0, 4, 0x9a, 1, 1, 0)
	b = appendFrame(b, &Query{Migration: MigrationID{1}})
	m, err := readMessage(bytes.NewReader(b), phaseControl, 1<<10, "frame size", nil)
	if err != nil || m.Type() != MsgQuery {
		t.Fatalf("got %v, %v; want the Query after the skipped frame", m, err)
	}
	// An unknown type below 0x80 is an error.
	_, err = readMessage(bytes.NewReader([]byte{0, 0, 0, 1, 0x55}), phaseControl, 1<<10, "frame size", nil)
	if !errors.Is(err, ErrMalformed) {
		t.Errorf("unknown critical type: %v, want ErrMalformed", err)
	}
	// A known type in the wrong place is ErrUnexpected.
	_, err = readMessage(bytes.NewReader(appendFrame(nil, &Hello{})), phaseControl, 1<<10, "frame size", nil)
	if !errors.Is(err, ErrUnexpected) {
		t.Errorf("hello on the control stream: %v, want ErrUnexpected", err)
	}
}

// TestDecodeTruncated cuts valid frames at every length: each prefix is an
// error (or a clean EOF at 0), never a panic.
func TestDecodeTruncated(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(5, 6))
	frames := [][]byte{encodeSnapshot(3, randSnapshot(rng, 40, 40))}
	for _, m := range allMessages(NewMigrationID(), []Verdict{{Index: 1, Code: VerdictOK}}) {
		frames = append(frames, appendFrame(nil, m))
	}
	for _, f := range frames {
		p := msgTable[f[4]].phase
		for n := 0; n < len(f); n++ {
			_, err := readMessage(bytes.NewReader(f[:n]), p, 1<<20, "frame size", nil)
			if n == 0 && err.Error() != "EOF" {
				t.Errorf("%s: empty input: %v, want EOF", MsgType(f[4]), err)
			}
			if n > 0 && !errors.Is(err, ErrTruncated) {
				t.Errorf("%s cut at %d of %d: %v, want ErrTruncated", MsgType(f[4]), n, len(f), err)
			}
		}
		// The body alone, cut short (a frame whose length was rewritten to
		// match): decoding fails or succeeds, never panics.
		for n := 5; n < len(f); n++ {
			body := f[5:n]
			if f[4] == byte(MsgSnapshot) {
				_, _, _ = decodeSnapshot(body)
			} else {
				_, _ = decodeMessage(p, MsgType(f[4]), body)
			}
		}
	}
}

func TestDecodeCorrupt(t *testing.T) {
	cases := []struct {
		name string
		body []byte
	}{
		{"tag varint runs off the end", []byte{0x80}},
		{"length varint runs off the end", []byte{12, 0x80}},
		{"length past the end", []byte{12, 5, 1}},
		{"tag 0", []byte{0, 1, 1}},
		{"varint overflows 32 bits", []byte{12, 5, 0xff, 0xff, 0xff, 0xff, 0x1f}},
		{"u8 overflow", []byte{8, 2, 0xac, 0x02}},
		{"value longer than its varint", []byte{12, 2, 1, 1}},
		{"empty integer value", []byte{12, 0}},
		{"bad address length", []byte{2, 5, 1, 2, 3, 4, 5}},
		{"short window", []byte{14, 3, 1, 2, 3}},
		{"unsent beyond the send queue", []byte{16, 2, 'a', 'b', 17, 1, 3}},
		{"bool that is 2", []byte{18, 3, 5, 1, 2}},
		{"options not a field list", []byte{18, 1, 0x80}},
		{"int32 overflow", []byte{18, 7, 2, 5, 0xff, 0xff, 0xff, 0xff, 0x7f}},
	}
	for _, c := range cases {
		_, _, err := decodeSnapshot(c.body)
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", c.name, err)
		}
	}
	msgCases := []struct {
		name string
		t    MsgType
		body []byte
	}{
		{"short migration id", MsgPrepare, []byte{1, 3, 1, 2, 3}},
		{"verdict without code", MsgVerdicts, []byte{2, 2, 1, 5}},
		{"reject without code", MsgReject, []byte{2, 1, 'x'}},
		{"abort without code", MsgAbort, nil},
		{"outcome without state", MsgOutcome, nil},
		{"bad prefix length", MsgSwitch, []byte{2, 5, 10, 0, 0, 1, 33}},
		{"bad packed varint", MsgCommit, []byte{2, 1, 0x80}},
		{"stream without kind", MsgStreamOpen, nil},
		{"tuple naming a preset past the presets", MsgPrepare, prepareTable.appendFields(nil, &Prepare{Count: 1,
			Tuples:  []Tuple{{Local: netip.MustParseAddrPort("198.18.0.10:80"), Remote: netip.MustParseAddrPort("198.18.0.1:4000"), Preset: 2}},
			Presets: []repair.Options{{NoDelay: true}}})},
		{"too many presets", MsgPrepare, prepareTable.appendFields(nil, &Prepare{Count: 1,
			Presets: make([]repair.Options, MaxPresets+1)})},
	}
	for _, c := range msgCases {
		_, err := decodeMessage(msgTable[c.t].phase, c.t, c.body)
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", c.name, err)
		}
	}
}

// failReader fails the test if more than n bytes are read from it.
type failReader struct {
	t *testing.T
	r *bytes.Reader
	n int
}

func (f *failReader) Read(p []byte) (int, error) {
	if len(p) > f.n {
		p = p[:f.n]
	}
	n, err := f.r.Read(p)
	f.n -= n
	if n == 0 && err == nil {
		f.t.Fatal("read past the frame header")
	}
	return n, err
}

// TestOversizedFrame: a length over the limit fails before the body is
// read or allocated.
func TestOversizedFrame(t *testing.T) {
	b := []byte{0xff, 0xff, 0xff, 0xff, byte(MsgPrepare), 1, 2, 3}
	r := &failReader{t: t, r: bytes.NewReader(b), n: frameHeaderSize}
	_, err := readMessage(r, phaseControl, 1<<20, "frame size", nil)
	var le *LimitError
	if !errors.As(err, &le) || le.Limit != "frame size" || le.Value != 1<<32-1 || le.Max != 1<<20 {
		t.Fatalf("got %v, want a *LimitError on the frame size", err)
	}
	if !errors.Is(err, ErrLimit) {
		t.Error("a *LimitError does not match ErrLimit")
	}
	_, err = readMessage(bytes.NewReader([]byte{0, 0, 0, 0, 1}), phaseControl, 1<<20, "frame size", nil)
	if !errors.Is(err, ErrMalformed) {
		t.Errorf("length 0: %v, want ErrMalformed", err)
	}
}

// TestLargeFrameAllocatesAsBytesArrive: a length under the limit but far
// beyond the bytes that follow does not make the reader allocate it.
func TestLargeFrameAllocatesAsBytesArrive(t *testing.T) {
	b := []byte{0x03, 0xff, 0xff, 0xff, byte(MsgSnapshot), 1, 2, 3} // claims 64 MiB
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := readBody(bytes.NewReader(b[5:]), 64<<20-1, nil)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, ErrTruncated) {
		t.Errorf("got %v, want ErrTruncated", err)
	}
	if d := after.TotalAlloc - before.TotalAlloc; d > 2*eagerAlloc {
		t.Errorf("allocated %d bytes for a 3-byte body", d)
	}
}

func TestMsgTypeString(t *testing.T) {
	if MsgCommit.String() != "COMMIT" || MsgType(0x7e).String() != "MSG(0x7e)" {
		t.Errorf("got %q %q", MsgCommit, MsgType(0x7e))
	}
	if VerdictConflict.String() != "conflict" || RejectVersion.String() != "version" ||
		AbortCanceled.String() != "canceled" || StateAborted.String() != "aborted" || CodecZstd.String() != "zstd" {
		t.Error("a String method returned the wrong name")
	}
}
