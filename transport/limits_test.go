package transport

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// ignorePeerLimits makes cl send what its peer announced it would refuse,
// as a buggy or hostile sender would.
func ignorePeerLimits(cl *Link) {
	cl.peer.Limits = Limits{MaxFrame: 1 << 30, MaxSnapshot: 1<<32 - 1, MaxMigration: 1 << 62,
		MaxConnections: 1<<32 - 1}
}

// sendAll writes the snapshots on one stream and closes it; it returns the
// first error.
func sendAll(ctx context.Context, cl *Link, idx []uint32, snaps []*repair.Snapshot) error {
	w, err := cl.OpenSnapshotStream(ctx)
	if err != nil {
		return err
	}
	for i := range idx {
		if err := w.Write(idx[i], snaps[i]); err != nil {
			w.Abort()
			return err
		}
	}
	return w.Close()
}

// readAll reads one stream to its end and returns the records read and the
// error that ended it (nil at a clean end).
func readAll(ctx context.Context, sv *Link) (int, error) {
	r, err := sv.AcceptSnapshotStream(ctx)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	n := 0
	for {
		_, _, err := r.Next()
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		n++
	}
}

func queueSnap(n int) *repair.Snapshot {
	return &repair.Snapshot{SendSeq: 1, RecvQueue: bytes.Repeat([]byte("q"), n)}
}

// TestReceiveLimits: each receive limit stops a sender that ignores it with
// a *LimitError naming the limit.
func TestReceiveLimits(t *testing.T) {
	cases := []struct {
		name    string
		limits  Limits
		idx     []uint32
		sizes   []int
		limit   string
		okCount int
	}{
		{"connections", Limits{MaxConnections: 5}, []uint32{0, 1, 2, 3, 4, 0}, []int{1, 1, 1, 1, 1, 1}, "connections", 5},
		{"connection index", Limits{MaxConnections: 5}, []uint32{1, 5}, []int{1, 1}, "connection index", 1},
		{"snapshot size", Limits{MaxSnapshot: 10000}, []uint32{0, 1}, []int{9000, 10000}, "snapshot size", 1},
		{"migration bytes", Limits{MaxMigration: 50000}, []uint32{0, 1, 2, 3, 4, 5, 6, 7}, []int{8000, 8000, 8000, 8000, 8000, 8000, 8000, 8000}, "migration bytes", 6},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			forKinds(t, func(t *testing.T, k kind) {
				cl, sv := linkPair(t, k, func(_, s *Config) { s.Limits = c.limits })
				ignorePeerLimits(cl)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				snaps := make([]*repair.Snapshot, len(c.sizes))
				for i, n := range c.sizes {
					snaps[i] = queueSnap(n)
				}
				go func() { _ = sendAll(ctx, cl, c.idx, snaps) }()
				n, err := readAll(ctx, sv)
				var le *LimitError
				if !errors.As(err, &le) || le.Limit != c.limit {
					t.Fatalf("got %v, want a *LimitError on %q", err, c.limit)
				}
				if n != c.okCount {
					t.Errorf("%d records read before the limit, want %d", n, c.okCount)
				}
				t.Log(err)
				cl.Close() // unblock the sender
			})
		})
	}
}

func TestDuplicateIndex(t *testing.T) {
	cl, sv := linkPair(t, kindTCP, nil)
	ctx := context.Background()
	if err := sendAll(ctx, cl, []uint32{3, 4}, []*repair.Snapshot{queueSnap(1), queueSnap(1)}); err != nil {
		t.Fatal(err)
	}
	if n, err := readAll(ctx, sv); n != 2 || err != nil {
		t.Fatal(n, err)
	}
	go func() { _ = sendAll(ctx, cl, []uint32{5, 3}, []*repair.Snapshot{queueSnap(1), queueSnap(1)}) }()
	if n, err := readAll(ctx, sv); n != 1 || !errors.Is(err, ErrDuplicate) {
		t.Fatalf("got %d, %v; want 1 record, then ErrDuplicate", n, err)
	}
}

// TestSenderRespectsPeerLimits: a record the peer would refuse fails at
// Write, before anything is sent, and the stream goes on.
func TestSenderRespectsPeerLimits(t *testing.T) {
	cl, sv := linkPair(t, kindTLS, func(_, s *Config) {
		s.Limits = Limits{MaxSnapshot: 1000, MaxConnections: 3}
	})
	ctx := context.Background()
	w, err := cl.OpenSnapshotStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var le *LimitError
	if err := w.Write(0, queueSnap(2000)); !errors.As(err, &le) || le.Limit != "peer's snapshot size" {
		t.Errorf("oversized snapshot: %v", err)
	}
	if err := w.Write(3, queueSnap(1)); !errors.As(err, &le) || le.Limit != "peer's connection index" {
		t.Errorf("index beyond the peer's limit: %v", err)
	}
	for i := uint32(0); i < 3; i++ {
		if err := w.Write(i, queueSnap(10)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Write(2, queueSnap(1)); !errors.As(err, &le) || le.Limit != "peer's connections" {
		t.Errorf("a fourth connection: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if n, err := readAll(ctx, sv); n != 3 || err != nil {
		t.Fatalf("got %d records, %v", n, err)
	}
}

// rawStream opens a stream on cl and writes b to it as it is, then closes it.
func rawStream(t *testing.T, cl *Link, b []byte) {
	t.Helper()
	st, err := cl.sess.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		_, _ = st.Write(b)
		st.Close()
	}()
}

func snapshotBody(t *testing.T, n int) []byte {
	rng := mrand.New(mrand.NewPCG(uint64(n), 1))
	var b []byte
	for i := 0; i < n; i++ {
		b = appendSnapshotFrame(b, uint32(i), randSnapshot(rng, 1000, 1000))
	}
	return appendFrame(b, &endRecord{Count: uint32(n)})
}

// rawChunks cuts body into raw chunks of at most n bytes.
func rawChunks(body []byte, n int) []byte {
	var out []byte
	for len(body) > 0 {
		k := min(n, len(body))
		out = binary.BigEndian.AppendUint32(out, uint32(k))
		out = append(out, body[:k]...)
		body = body[k:]
	}
	return out
}

// zstdChunk returns one compressed chunk holding p.
func zstdChunk(t testing.TB, p []byte, opts ...zstd.EOption) []byte {
	enc, err := zstd.NewWriter(nil, opts...)
	if err != nil {
		t.Fatal(err)
	}
	z := enc.EncodeAll(p, nil)
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(z))|chunkZstd), z...)
}

// zstdChunks cuts body into compressed chunks of at most n bytes.
func zstdChunks(t testing.TB, body []byte, n int) []byte {
	var out []byte
	for len(body) > 0 {
		k := min(n, len(body))
		out = append(out, zstdChunk(t, body[:k])...)
		body = body[k:]
	}
	return out
}

// TestSnapshotStreamInputs feeds hand-made snapshot streams to a reader.
func TestSnapshotStreamInputs(t *testing.T) {
	body := snapshotBody(t, 20)
	records := body[:len(body)-len(appendFrame(nil, &endRecord{Count: 20}))]
	zopen := appendFrame(nil, &streamOpen{Kind: StreamSnapshots, Codec: CodecZstd})
	nopen := appendFrame(nil, &streamOpen{Kind: StreamSnapshots, Codec: CodecNone})
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	zchunks := zstdChunks(t, body, 10000)
	corrupt := bytes.Clone(zchunks)
	for i := 20; i < 40; i++ {
		corrupt[i] ^= 0x5a
	}
	half := len(body) / 2
	bomb := zstdChunk(t, make([]byte, 10<<20))
	bigWindow := zstdChunk(t, body, zstd.WithWindowSize(64<<20), zstd.WithSingleSegment(false))
	cases := []struct {
		name string
		in   []byte
		ok   int
		is   error
	}{
		{"zstd chunks", cat(zopen, zchunks), 20, nil},
		{"raw chunks", cat(nopen, rawChunks(body, 777)), 20, nil},
		{"raw and zstd chunks", cat(zopen, rawChunks(body[:half], 5000), zstdChunks(t, body[half:], 3000)), 20, nil},
		{"one byte per chunk", cat(nopen, rawChunks(body, 1)), 20, nil},
		{"no end record", cat(nopen, rawChunks(records, 4096)), 20, ErrTruncated},
		{"cut in a record", cat(nopen, rawChunks(body[:half], 4096)), -1, ErrTruncated},
		{"chunk cut short", cat(zopen, zchunks[:len(zchunks)-10]), -1, ErrTruncated},
		{"chunk header cut short", cat(nopen, rawChunks(body, 4096), []byte{0, 0}), 20, ErrTruncated},
		{"zstd corrupt", cat(zopen, corrupt), 0, ErrMalformed},
		{"zstd bomb", cat(zopen, bomb), 0, ErrLimit},
		{"zstd window over the chunk", cat(zopen, bigWindow), -1, nil},
		{"not zstd", cat(zopen, []byte{0x80, 0, 0, 4, 1, 2, 3, 4}), 0, ErrMalformed},
		{"compressed chunk in an uncompressed stream", cat(nopen, zchunks), 0, ErrMalformed},
		{"chunk over the limit", cat(nopen, binary.BigEndian.AppendUint32(nil, MaxChunk+1)), 0, ErrLimit},
		{"empty chunk", cat(nopen, []byte{0, 0, 0, 0}), 0, ErrMalformed},
		{"data after the end", cat(nopen, rawChunks(cat(body, []byte{1, 2, 3}), 4096)), 20, ErrMalformed},
		{"wrong count in end", cat(nopen, rawChunks(cat(records, appendFrame(nil, &endRecord{Count: 3})), 4096)), 20, ErrMalformed},
		{"a control stream", appendFrame(nil, &streamOpen{Kind: StreamControl}), 0, ErrUnexpected},
		{"control message inside", cat(nopen, rawChunks(appendFrame(nil, &Commit{}), 100)), 0, ErrUnexpected},
		{"empty stream", nil, 0, ErrTruncated},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cl, sv := linkPair(t, kindTCP, nil)
			rawStream(t, cl, c.in)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			n, err := readAll(ctx, sv)
			if c.is == nil && c.ok >= 0 && err != nil || c.is != nil && !errors.Is(err, c.is) {
				t.Errorf("got %v, want %v", err, c.is)
			}
			if c.ok >= 0 && n != c.ok {
				t.Errorf("%d records before the end, want %d", n, c.ok)
			}
			if err != nil {
				t.Log(err)
			}
		})
	}
	t.Run("codec not offered", func(t *testing.T) {
		cl, sv := linkPair(t, kindTCP, func(_, s *Config) { s.Compression = CompressNever })
		rawStream(t, cl, cat(zopen, zchunks))
		if _, err := readAll(context.Background(), sv); !errors.Is(err, ErrMalformed) {
			t.Errorf("got %v, want ErrMalformed", err)
		}
	})
}

// TestWriterAbort: an aborted stream reads as truncated.
func TestWriterAbort(t *testing.T) {
	forKinds(t, func(t *testing.T, k kind) {
		cl, sv := linkPair(t, k, nil)
		ctx := context.Background()
		w, err := cl.OpenSnapshotStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Write(1, queueSnap(100)); err != nil {
			t.Fatal(err)
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		w.Abort()
		if err := w.Write(2, queueSnap(1)); err == nil {
			t.Error("Write after Abort succeeded")
		}
		n, err := readAll(ctx, sv)
		if n != 1 || !errors.Is(err, ErrTruncated) {
			t.Fatalf("got %d, %v; want 1 record, then ErrTruncated", n, err)
		}
	})
}

// TestStreamContext: the context given to OpenSnapshotStream and
// AcceptSnapshotStream bounds the stream.
func TestStreamContext(t *testing.T) {
	cl, sv := linkPair(t, kindTCP, nil)
	ctx, cancel := context.WithCancel(context.Background())
	w, err := cl.OpenSnapshotStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Abort()
	r, err := sv.AcceptSnapshotStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	time.AfterFunc(20*time.Millisecond, cancel)
	if _, _, err := r.Next(); !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want the context's end", err)
	}
	actx, acancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer acancel()
	if _, err := sv.AcceptSnapshotStream(actx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("accept: %v, want DeadlineExceeded", err)
	}
}

// TestCompressionPolicy: CompressAuto compresses when the compressor
// outruns the link and the data shrinks, and probes now and then when not.
func TestCompressionPolicy(t *testing.T) {
	var p policy
	if !p.compress(CompressAuto) {
		t.Error("no estimates yet: want a compressed probe")
	}
	p.compressed(128<<10, 68<<10, 650*time.Microsecond) // ~200 MB/s, ratio 1.9
	p.wire(128<<10, 200*time.Microsecond)               // ~650 MB/s: a fast link
	var probes []int
	for i := 1; i <= 4000; i++ {
		if p.compress(CompressAuto) {
			probes = append(probes, i)
			p.compressed(128<<10, 68<<10, 650*time.Microsecond)
		}
	}
	// Probes at 32, then 64, 128 … 1024 chunks apart.
	want := []int{32, 96, 224, 480, 992, 2016, 3040}
	if fmt.Sprint(probes) != fmt.Sprint(want) {
		t.Errorf("fast link: probes at %v, want %v", probes, want)
	}
	for i := 0; i < 20; i++ {
		p.wire(128<<10, 1300*time.Microsecond) // ~100 MB/s: a slow link
	}
	for i := 0; i < 10; i++ {
		if !p.compress(CompressAuto) {
			t.Fatal("slow link, data that compresses: want compression")
		}
	}
	for i := 0; i < 20; i++ {
		p.compressed(128<<10, 128<<10, 650*time.Microsecond) // incompressible
	}
	if p.compress(CompressAuto) {
		t.Error("slow link, incompressible data: want raw")
	}
	if !p.compress(CompressAlways) || p.compress(CompressNever) {
		t.Error("CompressAlways and CompressNever must not adapt")
	}
}

// TestWriterStats: the modes show in what was sent.
func TestWriterStats(t *testing.T) {
	for _, mode := range []Compression{CompressAlways, CompressNever, CompressAuto} {
		cl, sv := linkPair(t, kindPipe, func(c, _ *Config) { c.Compression = mode })
		ctx := context.Background()
		ring := newQueueRing()
		w, err := cl.OpenSnapshotStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		go func() { _, _ = readAll(ctx, sv) }()
		for i := 0; i < 100; i++ {
			if err := w.Write(uint32(i), benchSnapshot(ring, 64<<10)); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		st := w.Stats()
		t.Logf("mode %d: %+v, ratio %.2f", mode, st, float64(st.Bytes)/float64(st.WireBytes))
		if st.Records != 100 || st.Chunks < 50 || st.Bytes < 100*64<<10 {
			t.Errorf("mode %d: stats %+v", mode, st)
		}
		switch mode {
		case CompressAlways:
			if st.Compressed != st.Chunks || float64(st.Bytes)/float64(st.WireBytes) < 1.5 {
				t.Errorf("CompressAlways: %+v", st)
			}
		case CompressNever:
			if st.Compressed != 0 || st.WireBytes <= st.Bytes {
				t.Errorf("CompressNever: %+v", st)
			}
		}
	}
}
