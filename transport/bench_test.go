package transport

import (
	"context"
	"io"
	mrand "math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// The benchmarks, with the command and the table in docs/protocol.md:
//
//	go test -run '^$' -bench . -benchmem ./transport/

// BenchmarkSnapshotCodec is the encoding and decoding of one snapshot
// record, without compression or I/O.
func BenchmarkSnapshotCodec(b *testing.B) {
	for _, c := range []struct {
		name string
		q    int
	}{{"idle", 0}, {"64KiB", 64 << 10}} {
		b.Run(c.name, func(b *testing.B) {
			rng := mrand.New(mrand.NewPCG(1, 1))
			s := randSnapshot(rng, c.q/4, c.q-c.q/4)
			var buf []byte
			b.SetBytes(int64(c.q))
			b.ReportAllocs()
			for b.Loop() {
				buf = appendSnapshotFrame(buf[:0], 7, s)
				if _, _, err := decodeSnapshot(buf[5:]); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(buf)), "wire-bytes")
		})
	}
}

// BenchmarkSnapshotStream is one snapshot through a snapshot stream of a
// link over an in-memory pipe: encoding, compression, yamux, decompression
// and decoding, without TLS or the kernel.
func BenchmarkSnapshotStream(b *testing.B) {
	for _, c := range []struct {
		name  string
		q     int
		codec string
	}{{"idle/zstd", 0, "zstd"}, {"idle/none", 0, "none"}, {"64KiB/zstd", 64 << 10, "zstd"}, {"64KiB/none", 64 << 10, "none"}} {
		b.Run(c.name, func(b *testing.B) {
			cl, sv := linkPair(b, kindPipe, func(cc, sc *Config) {
				if c.codec == "none" {
					cc.Compression = CompressNever
				} else {
					cc.Compression = CompressAlways
				}
				cc.Limits.MaxConnections, sc.Limits.MaxConnections = 1<<32-1, 1<<32-1
				cc.Limits.MaxMigration, sc.Limits.MaxMigration = 1<<62, 1<<62
			})
			ring := newQueueRing()
			s := benchSnapshot(ring, c.q)
			b.SetBytes(int64(c.q))
			b.ReportAllocs()
			b.ResetTimer()
			if err := pump(cl, sv, 1, b.N, func(int) *repair.Snapshot { return s }); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkLink is the throughput of 10,000 snapshots with 64 KiB of queue
// data each (about 2:1 compressible) through a TLS+yamux link on loopback,
// for each compression mode, beside io.Copy of the same bytes over a raw
// stream of the same link. The machine is shared, so each iteration runs
// copy, snapshots, snapshots, copy, and reports both speeds (MB/s of queue
// bytes) and their ratio (x-copy).
func BenchmarkLink(b *testing.B) {
	const (
		conns = 10000
		qlen  = 64 << 10
	)
	ring := newQueueRing()
	for _, c := range []struct {
		name    string
		mode    Compression
		streams int
	}{{"auto", CompressAuto, 1}, {"none", CompressNever, 1}, {"zstd", CompressAlways, 1}, {"zstd-2streams", CompressAlways, 2}} {
		b.Run(c.name, func(b *testing.B) {
			cl, sv := linkPair(b, kindTLS, func(cc, sc *Config) {
				cc.Compression = c.mode
			})
			b.ResetTimer()
			var (
				snapTime, copyTime time.Duration
				st                 WriterStats
			)
			for i := 0; i < b.N; i++ {
				for _, run := range []string{"copy", "snap", "snap", "copy"} {
					start := time.Now()
					var err error
					if run == "copy" {
						err = plainCopy(cl, sv, ring, conns*qlen)
					} else {
						st, err = pumpStats(cl, sv, c.streams, conns, func(int) *repair.Snapshot { return benchSnapshot(ring, qlen) })
					}
					if err != nil {
						b.Fatal(err)
					}
					if run == "copy" {
						copyTime += time.Since(start)
					} else {
						snapTime += time.Since(start)
					}
				}
			}
			b.StopTimer()
			total := float64(2*b.N) * conns * qlen
			b.ReportMetric(total/snapTime.Seconds()/1e6, "MB/s")
			b.ReportMetric(total/copyTime.Seconds()/1e6, "copy-MB/s")
			b.ReportMetric(copyTime.Seconds()/snapTime.Seconds(), "x-copy")
			reportStats(b, st)
		})
	}
}

// queueRing hands out 64 KiB windows of a 16 MiB buffer of queue data, in
// turn, so that no two snapshots within zstd's window share bytes: the
// compression ratio is that of the data, not of repetition.
type queueRing struct {
	mu  sync.Mutex
	buf []byte
	off int
}

func newQueueRing() *queueRing {
	r := &queueRing{buf: make([]byte, 16<<20)}
	fillQueue(mrand.New(mrand.NewPCG(42, 42)), r.buf)
	return r
}

func (r *queueRing) next(n int) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.off+n > len(r.buf) {
		r.off = 0
	}
	p := r.buf[r.off : r.off+n]
	r.off += n
	return p
}

// Read fills p from the ring, for io.Copy.
func (r *queueRing) Read(p []byte) (int, error) { return copy(p, r.next(min(len(p), 64<<10))), nil }

func benchSnapshot(ring *queueRing, q int) *repair.Snapshot {
	s := &repair.Snapshot{Family: 2, State: repair.StateEstablished, Flags: repair.FlagSACK | repair.FlagWScale | repair.FlagWindow,
		SndWScale: 7, RcvWScale: 7, MSSClamp: 1460, SendSeq: 123456789, RecvSeq: 987654321,
		Window:  repair.Window{SndWl1: 987654000, SndWnd: 64240, MaxWindow: 65535, RcvWnd: 65535, RcvWup: 987654321},
		Options: repair.Options{SndBuf: 87040, RcvBuf: 131072, NoDelay: true, TTL: 64, Congestion: "cubic", Mask: repair.OptCongestion},
	}
	if q > 0 {
		p := ring.next(q)
		s.RecvQueue, s.SendQueue = p[:q/4], p[q/4:]
		s.Unsent = uint32(len(s.SendQueue) / 2)
	}
	return s
}

// pump sends n snapshots from cl to sv over streams parallel streams, in
// repeated rounds of at most 10,000 (the connection limit of one link is
// reset between rounds).
func pump(cl, sv *Link, streams, n int, snap func(int) *repair.Snapshot) error {
	for n > 0 {
		k := min(n, 10000)
		if err := pumpOnce(cl, sv, streams, k, snap); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// pumpOnce sends n snapshots (indices 0 to n-1) from cl to sv and waits for
// all of them to be read.
func pumpOnce(cl, sv *Link, streams, n int, snap func(int) *repair.Snapshot) error {
	_, err := pumpStats(cl, sv, streams, n, snap)
	return err
}

// pumpStats is pumpOnce; it also returns the writers' statistics, summed.
func pumpStats(cl, sv *Link, streams, n int, snap func(int) *repair.Snapshot) (WriterStats, error) {
	// A new migration on the same link: forget the indices seen.
	sv.mu.Lock()
	sv.seen, sv.records, sv.bytes = nil, 0, 0
	sv.mu.Unlock()
	cl.sent.records.Store(0)
	cl.sent.bytes.Store(0)

	ctx := context.Background()
	errc := make(chan error, 2*streams)
	var (
		mu    sync.Mutex
		total WriterStats
	)
	for s := 0; s < streams; s++ {
		go func() {
			w, err := cl.OpenSnapshotStream(ctx)
			if err != nil {
				errc <- err
				return
			}
			for i := s; i < n; i += streams {
				if err := w.Write(uint32(i), snap(i)); err != nil {
					w.Abort()
					errc <- err
					return
				}
			}
			err = w.Close()
			st := w.Stats()
			mu.Lock()
			total.Records += st.Records
			total.Chunks += st.Chunks
			total.Compressed += st.Compressed
			total.Bytes += st.Bytes
			total.WireBytes += st.WireBytes
			mu.Unlock()
			errc <- err
		}()
		go func() {
			r, err := sv.AcceptSnapshotStream(ctx)
			if err != nil {
				errc <- err
				return
			}
			defer r.Close()
			for {
				_, _, err := r.Next()
				if err == io.EOF {
					errc <- nil
					return
				}
				if err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	var first error
	for i := 0; i < 2*streams; i++ {
		if err := <-errc; err != nil && first == nil {
			first = err
		}
	}
	return total, first
}

// reportStats adds the share of chunks sent compressed and the ratio of
// body bytes to wire bytes to a benchmark's results.
func reportStats(b *testing.B, st WriterStats) {
	if st.Chunks > 0 {
		b.ReportMetric(100*float64(st.Compressed)/float64(st.Chunks), "%zstd-chunks")
		b.ReportMetric(float64(st.Bytes)/float64(st.WireBytes), "ratio")
	}
}

// plainCopy copies n bytes from the ring over a raw yamux stream of the
// link, with io.Copy on both ends.
func plainCopy(cl, sv *Link, ring *queueRing, n int64) error {
	errc := make(chan error, 1)
	go func() {
		st, err := sv.sess.AcceptStream()
		if err != nil {
			errc <- err
			return
		}
		defer st.Close()
		_, err = io.Copy(io.Discard, st)
		errc <- err
	}()
	st, err := cl.sess.OpenStream()
	if err != nil {
		return err
	}
	if _, err := io.Copy(st, io.LimitReader(ring, n)); err != nil {
		return err
	}
	st.Close()
	return <-errc
}

// BenchmarkLinkThrottled is BenchmarkLink over a link limited to 100 MB/s
// (800 Mbit/s) from source to target: a network slower than one core's
// zstd, where compression pays.
func BenchmarkLinkThrottled(b *testing.B) {
	const (
		conns = 2000
		qlen  = 64 << 10
		rate  = 100e6
	)
	ring := newQueueRing()
	for _, c := range []struct {
		name string
		mode Compression
	}{{"auto", CompressAuto}, {"zstd", CompressAlways}, {"none", CompressNever}, {"copy", 0}} {
		b.Run(c.name, func(b *testing.B) {
			ccfg, scfg := configs(b, kindTLS)
			ccfg.Compression = c.mode
			cc, sc := connPair(b, kindTCP)
			cl, sv, cerr, serr := handshakeConns(&throttledConn{Conn: cc, rate: rate}, sc, ccfg, scfg)
			if cerr != nil || serr != nil {
				b.Fatal(cerr, serr)
			}
			defer cl.Close()
			defer sv.Close()
			b.SetBytes(conns * qlen)
			b.ResetTimer()
			start := time.Now()
			var st WriterStats
			for i := 0; i < b.N; i++ {
				var err error
				if c.name == "copy" {
					err = plainCopy(cl, sv, ring, conns*qlen)
				} else {
					st, err = pumpStats(cl, sv, 1, conns, func(i int) *repair.Snapshot { return benchSnapshot(ring, qlen) })
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)*conns*qlen/time.Since(start).Seconds()/1e6, "MB/s")
			reportStats(b, st)
		})
	}
}

// throttledConn limits the rate of its writes, like a slower network.
type throttledConn struct {
	net.Conn
	rate float64 // bytes per second
	mu   sync.Mutex
	next time.Time
}

func (c *throttledConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	now := time.Now()
	if c.next.Before(now) {
		c.next = now
	}
	c.next = c.next.Add(time.Duration(float64(len(p)) / c.rate * float64(time.Second)))
	wait := time.Until(c.next)
	c.mu.Unlock()
	if wait > time.Millisecond {
		time.Sleep(wait)
	}
	return c.Conn.Write(p)
}
