package transport

import (
	"bytes"
	"context"
	"errors"
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
		MaxConnections: 1<<32 - 1, DecoderMaxWindow: 1 << 30}
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

func zstdCompress(t *testing.T, p []byte, opts ...zstd.EOption) []byte {
	var out bytes.Buffer
	enc, err := zstd.NewWriter(&out, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := enc.Write(p); err != nil {
		t.Fatal(err)
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// TestSnapshotStreamInputs feeds hand-made snapshot streams to a reader.
func TestSnapshotStreamInputs(t *testing.T) {
	body := snapshotBody(t, 20)
	records := body[:len(body)-len(appendFrame(nil, &endRecord{Count: 20}))]
	zopen := appendFrame(nil, &streamOpen{Kind: StreamSnapshots, Codec: CodecZstd})
	nopen := appendFrame(nil, &streamOpen{Kind: StreamSnapshots, Codec: CodecNone})
	good := zstdCompress(t, body, zstd.WithWindowSize(EncoderWindow))
	corrupt := bytes.Clone(good)
	for i := len(corrupt) / 2; i < len(corrupt)/2+16; i++ {
		corrupt[i] ^= 0x5a
	}
	// A window of 64 MiB over 10 MiB of data, against the default 8 MiB
	// limit: the frame header alone asks for more than the decoder allows.
	bigWindow := zstdCompress(t, append(bytes.Repeat(body, 10<<20/len(body)+1), body...),
		zstd.WithWindowSize(64<<20), zstd.WithEncoderLevel(zstd.SpeedFastest))
	cases := []struct {
		name string
		in   []byte
		ok   int
		is   error
	}{
		{"zstd", append(bytes.Clone(zopen), good...), 20, nil},
		{"none", append(bytes.Clone(nopen), body...), 20, nil},
		{"no end record", append(bytes.Clone(nopen), records...), 20, ErrTruncated},
		{"cut in a record", append(bytes.Clone(nopen), body[:len(body)/2]...), -1, ErrTruncated},
		{"zstd cut short", append(bytes.Clone(zopen), good[:len(good)/2]...), -1, ErrTruncated},
		{"zstd corrupt", append(bytes.Clone(zopen), corrupt...), -1, ErrMalformed},
		{"zstd window over the limit", append(bytes.Clone(zopen), bigWindow...), 0, ErrLimit},
		{"not zstd", append(bytes.Clone(zopen), body...), 0, ErrMalformed},
		{"data after the end", append(append(bytes.Clone(nopen), body...), 1, 2, 3), 20, ErrMalformed},
		{"wrong count in end", append(append(bytes.Clone(nopen), records...), appendFrame(nil, &endRecord{Count: 3})...), 20, ErrMalformed},
		{"a control stream", appendFrame(nil, &streamOpen{Kind: StreamControl}), 0, ErrUnexpected},
		{"control message inside", append(bytes.Clone(nopen), appendFrame(nil, &Commit{})...), 0, ErrUnexpected},
		{"empty stream", nil, 0, ErrTruncated},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cl, sv := linkPair(t, kindTCP, nil)
			rawStream(t, cl, c.in)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			n, err := readAll(ctx, sv)
			if c.is == nil && err != nil || c.is != nil && !errors.Is(err, c.is) {
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
		cl, sv := linkPair(t, kindTCP, func(_, s *Config) { s.Uncompressed = true })
		rawStream(t, cl, append(bytes.Clone(zopen), good...))
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
