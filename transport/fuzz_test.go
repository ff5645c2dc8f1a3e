package transport

import (
	"bytes"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// The fuzz targets. Each runs alone:
//
//	go test -run '^$' -fuzz '^FuzzFrame$' -fuzztime 10s ./transport/
//
// Their seed corpus is in testdata/fuzz/<name>/, written from valid
// encodings by TestWriteFuzzSeeds (TRANSPORT_WRITE_FUZZ_SEEDS=1).

// frameSeeds are valid frames: every message, alone and in sequence.
func frameSeeds() [][]byte {
	id := MigrationID{1, 2, 3}
	msgs := allMessages(id, []Verdict{{Index: 1, Code: VerdictOK}, {Index: 2, Code: VerdictFailed, Reason: "EEXIST"}})
	var seeds [][]byte
	var all []byte
	for _, m := range msgs {
		if m.Type() == MsgEnd {
			continue
		}
		f := appendFrame(nil, m)
		seeds = append(seeds, f)
		if msgTable[m.Type()].phase == phaseControl {
			all = append(all, f...)
		}
	}
	// An ancillary frame before a control message.
	seeds = append(seeds, append([]byte{0, 0, 0, 3, 0x81, 1, 0}, appendFrame(nil, &Query{Migration: id})...))
	return append(seeds, all)
}

// snapshotSeeds are valid snapshot record bodies.
func snapshotSeeds() [][]byte {
	rng := mrand.New(mrand.NewPCG(9, 9))
	return [][]byte{
		appendSnapshot(nil, 0, &repair.Snapshot{}),
		appendSnapshot(nil, 1, randSnapshot(rng, 0, 0)),
		appendSnapshot(nil, 77, randSnapshot(rng, 40, 60)),
		appendSnapshot(nil, 1<<31, &repair.Snapshot{Local: netip.MustParseAddrPort("198.18.0.2:80"),
			SendQueue: []byte("abc"), Unsent: 3}),
	}
}

// streamSeeds are valid snapshot stream contents (after the yamux stream
// header): raw chunks, compressed chunks, and both.
func streamSeeds(t testing.TB) [][]byte {
	rng := mrand.New(mrand.NewPCG(10, 10))
	var body []byte
	body = appendSnapshotFrame(body, 0, &repair.Snapshot{SendSeq: 1, RecvQueue: []byte("GET / HTTP/1.1\r\n")})
	body = appendSnapshotFrame(body, 1, &repair.Snapshot{Local: netip.MustParseAddrPort("[fd00::1]:80"),
		SendQueue: []byte("HTTP/1.1 200 OK\r\n\r\nhello"), Unsent: 5, Options: repair.Options{NoDelay: true}})
	body = appendSnapshotFrame(body, 2, randSnapshot(rng, 0, 0))
	body = appendFrame(body, &endRecord{Count: 3})
	zopen := appendFrame(nil, &streamOpen{Kind: StreamSnapshots, Codec: CodecZstd})
	nopen := appendFrame(nil, &streamOpen{Kind: StreamSnapshots, Codec: CodecNone})
	// Pre-copies (version 3): one confirmed, one replaced by its final
	// record.
	var passes []byte
	for _, r := range []record{
		{index: 4, pass: PassPre, snap: repair.Snapshot{SendSeq: 9, RecvQueue: []byte("pre")}},
		{index: 5, pass: PassPre, snap: *randSnapshot(rng, 10, 10)},
		{index: 4, pass: PassConfirm},
		{index: 5, snap: repair.Snapshot{SendSeq: 10, RecvQueue: []byte("final")}},
	} {
		start := len(passes)
		passes = append(passes, 0, 0, 0, 0, byte(MsgSnapshot))
		passes = snapshotTable.appendFields(passes, &r)
		putFrameLength(passes[start:], len(passes)-start-4)
	}
	passes = appendFrame(passes, &endRecord{Count: 4})
	return [][]byte{
		append(bytes.Clone(nopen), rawChunks(passes, 50)...),
		append(bytes.Clone(nopen), rawChunks(body, 300)...),
		append(bytes.Clone(zopen), zstdChunks(t, body, 100)...),
		append(append(bytes.Clone(zopen), rawChunks(body[:60], 60)...), zstdChunks(t, body[60:], 4096)...),
	}
}

func FuzzFrame(f *testing.F) {
	for _, s := range frameSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, p := range []phase{phaseHandshake, phaseStream, phaseControl} {
			r := bytes.NewReader(b)
			for {
				m, err := readMessage(r, p, 1<<16, "frame size", nil)
				if err != nil {
					break
				}
				// Whatever decodes, encodes to something that decodes
				// to the same message.
				again, err := readMessage(bytes.NewReader(appendFrame(nil, m)), p, 1<<20, "frame size", nil)
				if err != nil {
					t.Fatalf("%s re-encoded does not decode: %v", m.Type(), err)
				}
				if !reflect.DeepEqual(again, m) {
					t.Fatalf("%s round trip:\n got %#v\nwant %#v", m.Type(), again, m)
				}
			}
		}
	})
}

func FuzzSnapshot(f *testing.F) {
	for _, s := range snapshotSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		i, s, err := decodeSnapshot(b)
		if err != nil {
			return
		}
		_ = s.SentUnacked()
		_ = s.NeverSent()
		j, again, err := decodeSnapshot(appendSnapshot(nil, i, s))
		if err != nil {
			t.Fatalf("re-encoded snapshot does not decode: %v", err)
		}
		if j != i || !reflect.DeepEqual(again, s) {
			t.Fatalf("round trip:\n got %d %+v\nwant %d %+v", j, again, i, s)
		}
	})
}

func FuzzSnapshotStream(f *testing.F) {
	for _, s := range streamSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		l := &Link{
			version: ProtocolVersion,
			limits:  Limits{MaxFrame: 1 << 16, MaxSnapshot: 1 << 20, MaxMigration: 8 << 20, MaxConnections: 1000},
			local:   &Hello{Codecs: 1<<CodecNone | 1<<CodecZstd},
		}
		r := newSnapshotReader(l, io.NopCloser(bytes.NewReader(b)))
		defer r.Close()
		for n := 0; ; n++ {
			rec, err := r.NextRecord()
			if err != nil {
				// A connection has at most a pre-copy and one other record.
				if err != io.EOF && n > 2*1000 {
					t.Fatalf("%d records over a limit of 1000 connections", n)
				}
				return
			}
			if rec.Pass == PassConfirm && (rec.Snap.Local.IsValid() || len(rec.Snap.RecvQueue) > 0) {
				t.Fatalf("a confirmation of %d came with a snapshot", rec.Index)
			}
			_ = rec.Snap.NeverSent()
		}
	})
}

// TestWriteFuzzSeeds writes the seed corpus of the fuzz targets. It runs
// only when asked: TRANSPORT_WRITE_FUZZ_SEEDS=1 go test -run TestWriteFuzzSeeds.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("TRANSPORT_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set TRANSPORT_WRITE_FUZZ_SEEDS=1 to rewrite testdata/fuzz")
	}
	for name, seeds := range map[string][][]byte{
		"FuzzFrame":          frameSeeds(),
		"FuzzSnapshot":       snapshotSeeds(),
		"FuzzSnapshotStream": streamSeeds(t),
	} {
		dir := filepath.Join("testdata", "fuzz", name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, s := range seeds {
			content := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
