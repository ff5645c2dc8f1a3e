package transport

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
	"github.com/klauspost/compress/zstd"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// A snapshot stream is a yamux stream that starts with a StreamOpen frame
// (kind snapshots; codec zstd if its chunks may be compressed), followed by
// its body: Snapshot records then one End record, cut into chunks of at most
// MaxChunk bytes. Each chunk is sent as it is or as one zstd frame, decided
// chunk by chunk (see Compression). See docs/protocol.md.
//
//	chunk := header:u32be payload
//	header bit 31: 1 = payload is a zstd frame, 0 = payload is raw
//	header bits 0-30: payload length, 1 to MaxChunk
//
// A zstd frame decodes to at most MaxChunk bytes.

// Encoders and decoders are pooled: a zstd encoder holds its match tables,
// and making one per stream would dominate the cost of a stream of small
// snapshots. Each runs with concurrency 1 (no goroutines of its own); the
// streams are the unit of parallelism.
var (
	encoderPool = sync.Pool{New: func() any {
		e, err := zstd.NewWriter(nil,
			zstd.WithEncoderLevel(zstd.SpeedFastest),
			// Literals are mostly what matching left: random bytes. Not
			// entropy-coding them is 20% faster at the same ratio on the
			// benchmark's data.
			zstd.WithNoEntropyCompression(true),
			zstd.WithEncoderConcurrency(1),
			zstd.WithWindowSize(MaxChunk),
			zstd.WithEncoderCRC(true),
		)
		if err != nil {
			panic("transport: zstd encoder: " + err.Error()) // the options are constant
		}
		warm(e)
		return e
	}}
	decoderPool = sync.Pool{New: func() any {
		d, err := zstd.NewReader(nil,
			zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxWindow(MaxChunk),
			zstd.WithDecoderMaxMemory(MaxChunk),
		)
		if err != nil {
			panic("transport: zstd decoder: " + err.Error())
		}
		return d
	}}
)

// warm makes a new encoder compress a little noise, so that its first real
// chunk does not pay for setting it up: a new encoder allocates its state on
// its first EncodeAll, which made a first chunk of 150 bytes take 0.15 to
// 0.3 ms against 1.5 µs after this (a first chunk of 128 KiB still costs
// about twice a later one: its pages fault in). The source opens its
// snapshot streams, and so takes their encoders from the pool, before its
// lock: warmed here, that cost stays out of the freeze.
func warm(e *zstd.Encoder) {
	var b [1 << 10]byte
	x := uint64(0x9e3779b97f4a7c15)
	for i := range b { // xorshift
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	e.EncodeAll(b[:], nil)
}

// Chunk buffers are pooled too: a writer holds inflight of them, a reader
// two, and a link may open many short streams.
var (
	chunkPool = sync.Pool{New: func() any {
		return &chunk{raw: make([]byte, chunkHeader, chunkHeader+MaxChunk)}
	}}
	bufPool = sync.Pool{New: func() any {
		b := make([]byte, 0, MaxChunk)
		return &b
	}}
)

func getBuf() []byte { return (*bufPool.Get().(*[]byte))[:0] }

func putBuf(b []byte) {
	if cap(b) == MaxChunk {
		bufPool.Put(&b)
	}
}

const (
	chunkZstd   = 1 << 31 // the header bit of a compressed chunk
	chunkHeader = 4
	// inflight is the number of chunk buffers of a writer: one being
	// filled, one being compressed or queued, one being sent.
	inflight = 3
)

// chunk is a buffer of the writer: header room, then the payload.
type chunk struct {
	raw  []byte // chunkHeader bytes of room, then up to MaxChunk body bytes
	wire []byte // what is sent: raw, or zbuf, with the header filled in
	zbuf []byte // the compressed form, header room included
	in   int    // body bytes in the chunk
	zstd bool
}

// WriterStats counts what a SnapshotWriter sent.
type WriterStats struct {
	Records    uint32 // records written
	Chunks     int    // chunks sent
	Compressed int    // of them, sent compressed
	Bytes      int64  // body bytes (records as encoded)
	WireBytes  int64  // chunk bytes on the stream, headers included
}

// SnapshotWriter writes (index, snapshot) records to one snapshot stream. It
// is not safe for concurrent use: open one stream per goroutine. Records are
// buffered in chunks: the caller's goroutine encodes and compresses them
// while a goroutine of the writer sends the previous chunk. Flush sends
// what was written so far; Close ends the stream.
type SnapshotWriter struct {
	link   *Link
	st     *yamux.Stream
	mode   Compression
	policy policy
	enc    *zstd.Encoder // nil when the stream is not compressed

	cur   *chunk      // being filled
	free  chan *chunk // buffers back from the sender
	sendq chan *chunk // to the sender goroutine
	done  chan struct{}

	mu      sync.Mutex // guards sendErr and the fields the sender updates
	sendErr error
	wireDur time.Duration // time the sender spent writing backlogged chunks, since the last seal
	wireN   int           // their bytes

	scratch []byte // the record being encoded
	stats   WriterStats
	err     error // sticky, in the caller's goroutine
	stop    func()
	closed  bool
}

// OpenSnapshotStream opens a snapshot stream to the peer. ctx bounds the
// stream's whole life: once it ends, writes fail. The caller must Close (or
// Abort) the writer.
func (l *Link) OpenSnapshotStream(ctx context.Context) (*SnapshotWriter, error) {
	const op = "open snapshot stream"
	if err := ctx.Err(); err != nil {
		return nil, opError(op, err)
	}
	st, err := l.sess.OpenStream()
	if err != nil {
		return nil, opError(op, l.ioErr(err))
	}
	w := &SnapshotWriter{link: l, st: st, mode: l.compression,
		free: make(chan *chunk, inflight), sendq: make(chan *chunk, 1), done: make(chan struct{})}
	if l.codec != CodecZstd {
		w.mode = CompressNever
	}
	w.stop = watchStream(ctx, st.SetWriteDeadline)
	codec := CodecNone
	if w.mode != CompressNever {
		codec = CodecZstd
		w.enc = encoderPool.Get().(*zstd.Encoder)
	}
	hdr := appendFrame(nil, &streamOpen{Kind: StreamSnapshots, Codec: codec})
	if _, err := st.Write(hdr); err != nil {
		w.release(l.ioErr(err))
		return nil, opError(op, w.err)
	}
	for i := 0; i < inflight; i++ {
		c := chunkPool.Get().(*chunk)
		c.raw = c.raw[:chunkHeader]
		w.free <- c
	}
	w.cur = <-w.free
	go w.sender()
	return w, nil
}

// sender writes chunks to the stream, in order, until sendq is closed. It
// measures the link's speed on the chunks it found already queued when it
// was ready for them: only then is the link the bottleneck, and the time a
// write takes its real cost.
func (w *SnapshotWriter) sender() {
	defer close(w.done)
	for {
		var c *chunk
		ready := time.Now()
		select {
		case c = <-w.sendq:
		case <-w.link.Done(): // an abandoned writer must not outlive its link
			w.fail(w.link.Err())
			return
		}
		if c == nil {
			return
		}
		backlogged := time.Since(ready) < backlogWait
		w.mu.Lock()
		failed := w.sendErr != nil
		w.mu.Unlock()
		if !failed {
			start := time.Now()
			_, err := w.st.Write(c.wire)
			d := time.Since(start)
			if backlogged {
				w.mu.Lock()
				w.wireDur += d
				w.wireN += len(c.wire)
				w.mu.Unlock()
			}
			if err != nil {
				w.fail(w.link.ioErr(err))
			}
		}
		w.free <- c
	}
}

func (w *SnapshotWriter) fail(err error) {
	w.mu.Lock()
	if w.sendErr == nil {
		w.sendErr = err
	}
	w.mu.Unlock()
}

// Write appends the record (index, s). It fails with a *LimitError, before
// writing anything, when the record exceeds a limit the peer announced (its
// MaxSnapshot, MaxConnections or MaxMigration); the stream stays usable.
// Any other error is sticky: the stream is lost, and Close returns it too.
func (w *SnapshotWriter) Write(index uint32, s *repair.Snapshot) error {
	return w.WriteState(index, s, nil)
}

// WriteState is Write with the application's opaque state for the
// connection, which the reader gets back from NextState.
func (w *SnapshotWriter) WriteState(index uint32, s *repair.Snapshot, state []byte) error {
	return w.write(index, PassFinal, s, state)
}

// WritePre is WriteState for a pre-copy (PassPre): a snapshot taken before
// the lock, which a later WriteState or Confirm of the same index, on the
// same stream, finalises. It needs a link of version 3.
func (w *SnapshotWriter) WritePre(index uint32, s *repair.Snapshot, state []byte) error {
	return w.write(index, PassPre, s, state)
}

// Confirm writes the record that makes connection index's pre-copy, written
// earlier on the same stream, its final snapshot (PassConfirm): a few
// bytes, where a final record would carry the whole snapshot again. It
// needs a link of version 3.
func (w *SnapshotWriter) Confirm(index uint32) error {
	return w.write(index, PassConfirm, &repair.Snapshot{}, nil)
}

func (w *SnapshotWriter) write(index uint32, pass Pass, s *repair.Snapshot, state []byte) error {
	const op = "snapshot write"
	if err := w.check(); err != nil {
		return opError(op, err)
	}
	if v := w.link.Version(); pass != PassFinal && v < 3 {
		return opError(op, fmt.Errorf("%w: a %s record needs protocol version 3, the link runs %d", ErrUnexpected, pass, v))
	}
	// The record is encoded with its queues last (as snapshotTable orders
	// them), so that large queues are copied once, into the chunks.
	r := record{index: index, pass: pass, snap: *s, state: state}
	rq, sq := s.RecvQueue, s.SendQueue
	r.snap.RecvQueue, r.snap.SendQueue = nil, nil
	b := append(w.scratch[:0], 0, 0, 0, 0, byte(MsgSnapshot))
	b = snapshotTable.appendFields(b, &r)
	size := len(b) - 4
	if len(rq) > 0 {
		size += uvarintLen(tagRecvQueue) + uvarintLen(uint64(len(rq))) + len(rq)
	}
	if len(sq) > 0 {
		size += uvarintLen(tagSendQueue) + uvarintLen(uint64(len(sq))) + len(sq)
	}
	if size >= 1<<32 {
		return opError(op, &LimitError{Limit: "snapshot size", Value: uint64(size), Max: 1<<32 - 1})
	}
	if err := w.link.reserveSend(index, pass, size); err != nil {
		return opError(op, fmt.Errorf("connection %d: %w", index, err))
	}
	putFrameLength(b, size)
	if len(rq) > 0 {
		b = appendHeader(b, tagRecvQueue, len(rq))
		w.put(b)
		b = b[:0]
		w.put(rq)
	}
	if len(sq) > 0 {
		b = appendHeader(b, tagSendQueue, len(sq))
		w.put(b)
		b = b[:0]
		w.put(sq)
	}
	w.put(b)
	if cap(b) <= 4<<10 {
		w.scratch = b[:0]
	}
	if w.err != nil {
		return opError(op, w.err)
	}
	w.stats.Records++
	return nil
}

func (w *SnapshotWriter) check() error {
	if w.err == nil {
		w.mu.Lock()
		w.err = w.sendErr
		w.mu.Unlock()
	}
	if w.err != nil {
		return w.err
	}
	if w.closed {
		return ErrClosed
	}
	return nil
}

// put appends body bytes to the chunks, sending each chunk that fills.
func (w *SnapshotWriter) put(p []byte) {
	for len(p) > 0 && w.err == nil {
		c := w.cur
		n := copy(c.raw[len(c.raw):cap(c.raw)], p)
		c.raw = c.raw[:len(c.raw)+n]
		p = p[n:]
		if len(c.raw) == cap(c.raw) {
			w.seal()
		}
	}
}

// seal compresses the current chunk if that pays, hands it to the sender
// and takes a free buffer.
func (w *SnapshotWriter) seal() {
	c := w.cur
	c.in = len(c.raw) - chunkHeader
	if c.in == 0 || w.err != nil {
		return
	}
	w.mu.Lock()
	wireDur, wireN := w.wireDur, w.wireN
	w.wireDur, w.wireN = 0, 0
	w.mu.Unlock()
	w.policy.wire(wireN, wireDur)

	c.wire, c.zstd = c.raw, false
	// A short chunk goes raw in CompressAuto, and is no probe: it is a
	// flush of a few snapshots, sent for latency, and compressing it would
	// save a few bytes at best.
	short := w.mode == CompressAuto && c.in < minCompress
	if w.enc != nil && !short && w.policy.compress(w.mode) {
		start := time.Now()
		c.zbuf = w.enc.EncodeAll(c.raw[chunkHeader:], append(c.zbuf[:0], 0, 0, 0, 0))
		zn := len(c.zbuf) - chunkHeader
		w.policy.compressed(c.in, zn, time.Since(start))
		if zn < c.in {
			c.wire, c.zstd = c.zbuf, true
		}
	}
	n := uint32(len(c.wire) - chunkHeader)
	if c.zstd {
		n |= chunkZstd
	}
	binary.BigEndian.PutUint32(c.wire, n)
	w.stats.Chunks++
	if c.zstd {
		w.stats.Compressed++
	}
	w.stats.Bytes += int64(c.in)
	w.stats.WireBytes += int64(len(c.wire))

	select {
	case w.sendq <- c:
	case <-w.done:
		w.mu.Lock()
		w.err = w.sendErr
		w.mu.Unlock()
		return
	}
	select {
	case w.cur = <-w.free:
	case <-w.done:
		w.mu.Lock()
		w.err = w.sendErr
		w.mu.Unlock()
		if w.err == nil {
			w.err = ErrClosed
		}
		return
	}
	w.cur.raw = w.cur.raw[:chunkHeader]
}

// Flush sends every record written so far and waits until the stream has
// taken them.
func (w *SnapshotWriter) Flush() error {
	const op = "snapshot flush"
	if err := w.check(); err != nil {
		return opError(op, err)
	}
	w.seal()
	// Every buffer back in the free list (or being filled) means the sender
	// has written everything.
	var held []*chunk
	for len(held) < inflight-1 && w.err == nil {
		select {
		case c := <-w.free:
			held = append(held, c)
		case <-w.done:
			w.mu.Lock()
			w.err = w.sendErr
			w.mu.Unlock()
		}
	}
	for _, c := range held {
		w.free <- c
	}
	if err := w.check(); err != nil {
		return opError(op, err)
	}
	return nil
}

// Close writes the End record, sends every chunk and closes the stream for
// writing: the peer's reader then sees every record and a clean end. Close
// returns the writer's first error, if any, and releases its resources in
// every case.
func (w *SnapshotWriter) Close() error {
	const op = "snapshot close"
	if w.closed {
		return nil
	}
	if w.check() == nil {
		w.put(appendFrame(w.scratch[:0], &endRecord{Count: w.stats.Records}))
		w.seal()
	}
	w.release(nil)
	if w.err != nil {
		return opError(op, w.err)
	}
	return nil
}

// Abort closes the stream without its End record: the peer's reader fails
// with ErrTruncated, and records not yet sent are dropped.
func (w *SnapshotWriter) Abort() {
	w.release(errAborted)
}

var errAborted = errors.New("transport: snapshot stream aborted")

// release stops the sender, closes the stream and returns the encoder. A
// non-nil err makes the sender drop what is queued.
func (w *SnapshotWriter) release(err error) {
	if w.closed {
		return
	}
	w.closed = true
	if err != nil {
		w.fail(err)
		if w.err == nil {
			w.err = err
		}
	}
	if w.cur != nil { // the sender runs
		close(w.sendq)
		<-w.done
		w.mu.Lock()
		if w.err == nil {
			w.err = w.sendErr
		}
		w.mu.Unlock()
		// The sender is gone: what is in free is no one's. (After an
		// error, cur may also sit in sendq; it is left to the collector.)
		for len(w.free) > 0 {
			chunkPool.Put(<-w.free)
		}
		if w.err == nil {
			chunkPool.Put(w.cur)
		}
	}
	if w.enc != nil {
		encoderPool.Put(w.enc)
		w.enc = nil
	}
	w.stop()
	_ = w.st.Close()
	w.cur, w.scratch = nil, nil
}

// Stats returns what the writer has sent so far.
func (w *SnapshotWriter) Stats() WriterStats { return w.stats }

// Count returns the number of records written.
func (w *SnapshotWriter) Count() uint32 { return w.stats.Records }

// policy decides, chunk by chunk, whether compressing pays. With the
// sending pipelined behind the compression, a compressed stream runs at
// min(c, r·L) bytes of body per second and a raw one at L, where c is the
// compression speed, r the ratio and L the speed at which the link takes
// bytes when it is the bottleneck. Compression pays when c > L and r > 1
// (by a margin: a ratio near 1 is not worth the CPU). L is only measured
// while the sender has a backlog; a link that never has one is not the
// bottleneck, and chunks go raw. A chunk is compressed anyway now and then
// to keep c and r current: after minProbe raw chunks, an interval that
// doubles, up to maxProbe, while compression keeps losing. On a fast link
// (loopback, or a network faster than one core's zstd) chunks go raw; on a
// slower one, compressed. A chunk shorter than minCompress goes raw.
type policy struct {
	c, r, l float64 // estimates: compression bytes/s, ratio, wire bytes/s
	n       int     // chunks since the last compressed one
	every   int     // the current probe interval
}

const (
	minProbe    = 32
	maxProbe    = 1024
	ewma        = 0.25                   // weight of the newest sample
	margin      = 1.1                    // the ratio compression must reach
	backlogWait = 100 * time.Microsecond // a chunk that came sooner was waiting
	// minCompress is the shortest chunk CompressAuto compresses. An idle
	// connection's record is about 150 bytes, which zstd does not shrink
	// (its frame adds some 15: header, block header, checksum), and
	// compressing one took 20-100 µs inside the freeze in the bench, even
	// with a warm encoder (caches cold).
	minCompress = 1 << 10
)

func (p *policy) compress(mode Compression) bool {
	switch mode {
	case CompressAlways:
		return true
	case CompressNever:
		return false
	}
	p.n++
	if p.c == 0 {
		return true // no estimate yet
	}
	if p.l > 0 && p.r > margin && p.c > p.l {
		p.every = minProbe
		return true
	}
	if p.every == 0 {
		p.every = minProbe
	}
	if p.n >= p.every {
		p.every = min(2*p.every, maxProbe)
		return true // a probe
	}
	return false
}

func (p *policy) compressed(in, out int, d time.Duration) {
	p.n = 0
	if d <= 0 || out <= 0 {
		return
	}
	p.c = mix(p.c, float64(in)/d.Seconds())
	p.r = mix(p.r, float64(in)/float64(out))
}

func (p *policy) wire(n int, d time.Duration) {
	if n > 0 && d > 0 {
		p.l = mix(p.l, float64(n)/d.Seconds())
	}
}

func mix(old, x float64) float64 {
	if old == 0 {
		return x
	}
	return old + ewma*(x-old)
}

// SnapshotReader reads the records of one snapshot stream. It is not safe
// for concurrent use. Each record is checked against this side's limits
// before it is read: its size, the link's count of connections and bytes,
// and its index (below MaxConnections, and new on this link).
type SnapshotReader struct {
	link   *Link
	st     io.ReadCloser // the yamux stream
	body   chunkReader
	opened bool // the StreamOpen frame was read
	count  uint32
	err    error // sticky; io.EOF after the End record
	stop   func()
	closed bool
	hdr    [frameHeaderSize]byte
}

// chunkReader reads the body of a snapshot stream: the chunks' payloads,
// decoded, one after the other.
type chunkReader struct {
	st    io.Reader
	codec Codec         // the codec the StreamOpen frame declared
	dec   *zstd.Decoder // taken from the pool at the first compressed chunk
	data  []byte        // the current chunk's unread bytes
	buf   []byte        // the current chunk, decoded
	zbuf  []byte        // a compressed payload
	eof   bool
}

// AcceptSnapshotStream waits for the peer to open a snapshot stream and
// returns its reader. ctx bounds the wait and the stream's whole life. The
// caller must Close the reader.
func (l *Link) AcceptSnapshotStream(ctx context.Context) (*SnapshotReader, error) {
	const op = "accept snapshot stream"
	st, err := l.sess.AcceptStreamWithContext(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil, opError(op, ctx.Err())
		}
		return nil, opError(op, l.ioErr(err))
	}
	r := newSnapshotReader(l, st)
	r.stop = watchStream(ctx, st.SetReadDeadline)
	return r, nil
}

// newSnapshotReader returns a reader of the snapshot stream st for link l.
func newSnapshotReader(l *Link, st io.ReadCloser) *SnapshotReader {
	return &SnapshotReader{link: l, st: st, body: chunkReader{st: st}, stop: func() {}}
}

// Next returns the next record: the connection's index and its snapshot,
// whose queues the caller owns. After the End record it returns io.EOF
// (unwrapped). An error is sticky: a stream that ended without its End
// record fails with ErrTruncated, a record over a limit with a *LimitError,
// a repeated index with ErrDuplicate, bad bytes with ErrMalformed.
func (r *SnapshotReader) Next() (uint32, *repair.Snapshot, error) {
	index, s, _, err := r.NextState()
	return index, s, err
}

// NextState is Next that also returns the application state written with
// the record (nil if none).
// It fails on a record that is not final (a pre-copy or a confirmation):
// a reader that takes those uses NextRecord.
func (r *SnapshotReader) NextState() (uint32, *repair.Snapshot, []byte, error) {
	rec, err := r.NextRecord()
	if err != nil {
		return 0, nil, nil, err
	}
	if rec.Pass != PassFinal {
		r.err = malformedf("snapshot %d: a %s record where only final ones are read", rec.Index, rec.Pass)
		r.releaseDecoder()
		return 0, nil, nil, opError("snapshot read", r.err)
	}
	return rec.Index, rec.Snap, rec.State, nil
}

// A Record is one snapshot record as NextRecord reads it.
type Record struct {
	// Index is the connection's index in the migration.
	Index uint32
	// Pass says whether Snap is final, a pre-copy, or (PassConfirm, Snap
	// empty) the confirmation of the pre-copy read before.
	Pass Pass
	// Snap is the snapshot; its queues alias the record's buffer.
	Snap *repair.Snapshot
	// State is the application's state written with it, or nil.
	State []byte
}

// NextRecord returns the next record of the stream, of any pass, or io.EOF
// after the end record. The link checks the passes' order for each index:
// at most one pre-copy, and a confirmation only after one; exactly one
// final or confirming record.
func (r *SnapshotReader) NextRecord() (Record, error) {
	if r.err != nil {
		if r.err == io.EOF {
			return Record{}, io.EOF
		}
		return Record{}, opError("snapshot read", r.err)
	}
	if r.closed {
		return Record{}, opError("snapshot read", ErrClosed)
	}
	rec, err := r.next()
	if err != nil {
		if err != io.EOF {
			err = r.mapErr(err)
		}
		r.err = err
		r.releaseDecoder()
		if err == io.EOF {
			return Record{}, io.EOF
		}
		return Record{}, opError("snapshot read", err)
	}
	return Record{Index: rec.index, Pass: rec.pass, Snap: &rec.snap, State: rec.state}, nil
}

func (r *SnapshotReader) next() (*record, error) {
	lim := &r.link.limits
	if !r.opened {
		if err := r.open(); err != nil {
			return nil, err
		}
	}
	for {
		size, t, err := readHeader(&r.body, &r.hdr)
		if err == io.EOF {
			return nil, fmt.Errorf("%w: the stream ended after %d records without its end record", ErrTruncated, r.count)
		}
		if err != nil {
			return nil, err
		}
		switch {
		case t == MsgSnapshot:
			if err := checkSize("snapshot size", size, lim.MaxSnapshot); err != nil {
				return nil, err
			}
			if err := r.link.admit(size); err != nil {
				return nil, err
			}
			// A fresh buffer per record: the snapshot's queues alias it.
			body, err := readBody(&r.body, int(size-1), nil)
			if err != nil {
				return nil, err
			}
			rec, err := decodeRecord(body)
			if err != nil {
				return nil, err
			}
			if err := r.link.admitIndex(rec.index, rec.pass); err != nil {
				return nil, err
			}
			r.count++
			return rec, nil
		case t == MsgEnd || t >= msgAncillary:
			if err := checkSize("frame size", size, lim.MaxFrame); err != nil {
				return nil, err
			}
			body, err := readBody(&r.body, int(size-1), nil)
			if err != nil {
				return nil, err
			}
			m, err := decodeMessage(phaseSnapshot, t, body)
			if err == errSkip {
				continue
			}
			if err != nil {
				return nil, err
			}
			if end := m.(*endRecord); end.Count != r.count {
				return nil, malformedf("end record counts %d records, the stream carried %d", end.Count, r.count)
			}
			return nil, r.finish()
		default:
			return nil, unexpected(t, phaseSnapshot)
		}
	}
}

// open reads the StreamOpen frame.
func (r *SnapshotReader) open() error {
	m, err := readMessage(r.st, phaseStream, r.link.limits.MaxFrame, "frame size", nil)
	if err == io.EOF {
		return fmt.Errorf("%w: the stream closed before its first frame", ErrTruncated)
	}
	if err != nil {
		return err
	}
	so := m.(*streamOpen)
	if so.Kind != StreamSnapshots {
		return fmt.Errorf("%w: a stream of kind %d where a snapshot stream was expected", ErrUnexpected, so.Kind)
	}
	if !r.link.local.Accepts(so.Codec) {
		return malformedf("the stream uses codec %s, which this side did not offer", so.Codec)
	}
	r.body.codec = so.Codec
	r.opened = true
	return nil
}

// Read returns io.EOF at the end of the stream, between two chunks.
func (r *chunkReader) Read(p []byte) (int, error) {
	for len(r.data) == 0 {
		if r.eof {
			return 0, io.EOF
		}
		if err := r.loadChunk(); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

// loadChunk reads the next chunk and decodes it.
func (r *chunkReader) loadChunk() error {
	var h [chunkHeader]byte
	n, err := io.ReadFull(r.st, h[:])
	if err == io.EOF {
		r.eof = true
		return nil
	}
	if err != nil {
		return bodyErr(err, n, chunkHeader)
	}
	hdr := binary.BigEndian.Uint32(h[:])
	size, compressed := hdr&^chunkZstd, hdr&chunkZstd != 0
	if size == 0 {
		return malformedf("empty chunk")
	}
	if err := checkSize("chunk size", size, MaxChunk); err != nil {
		return err
	}
	if r.buf == nil {
		r.buf = getBuf()
	}
	if !compressed {
		r.data, err = readBody(r.st, int(size), r.buf)
		return err
	}
	if r.codec != CodecZstd {
		return malformedf("a compressed chunk in a stream declared uncompressed")
	}
	if r.zbuf == nil {
		r.zbuf = getBuf()
	}
	z, err := readBody(r.st, int(size), r.zbuf)
	if err != nil {
		return err
	}
	if r.dec == nil {
		r.dec = decoderPool.Get().(*zstd.Decoder)
	}
	// The decoder stops at MaxChunk bytes (WithDecoderMaxMemory), whatever
	// the frame claims, and r.buf holds that much: DecodeAll allocates
	// nothing.
	out, err := r.dec.DecodeAll(z, r.buf[:0])
	switch {
	case errors.Is(err, zstd.ErrDecoderSizeExceeded), errors.Is(err, zstd.ErrWindowSizeExceeded):
		return &LimitError{Limit: "decoded chunk size", Max: MaxChunk}
	case err != nil:
		return malformedf("zstd chunk: %v", err)
	case len(out) == 0:
		return malformedf("a compressed chunk that decodes to nothing")
	}
	r.data = out
	return nil
}

// finish checks that the body ends right after the End record.
func (r *SnapshotReader) finish() error {
	var one [1]byte
	n, err := io.ReadFull(&r.body, one[:])
	if n > 0 {
		return malformedf("data after the end record")
	}
	if err != io.EOF {
		return err
	}
	return io.EOF
}

// mapErr turns a read error into the clearest error for the caller.
func (r *SnapshotReader) mapErr(err error) error {
	switch {
	case errors.Is(err, ErrMalformed), errors.Is(err, ErrLimit),
		errors.Is(err, ErrDuplicate), errors.Is(err, ErrUnexpected):
		return err
	}
	if lerr := r.link.Err(); lerr != nil {
		return lerr
	}
	switch {
	case errors.Is(err, yamux.ErrTimeout):
		return fmt.Errorf("stream deadline: %w", context.DeadlineExceeded)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: %v", ErrTruncated, err)
	}
	return err
}

func (r *SnapshotReader) releaseDecoder() {
	b := &r.body
	if b.dec != nil {
		decoderPool.Put(b.dec)
		b.dec = nil
	}
	putBuf(b.buf)
	putBuf(b.zbuf)
	b.buf, b.zbuf, b.data = nil, nil, nil
}

// Count returns the number of records read.
func (r *SnapshotReader) Count() uint32 { return r.count }

// Close closes the stream. Records not yet read are dropped.
func (r *SnapshotReader) Close() error {
	if r.closed {
		return nil
	}
	r.closed = true
	r.releaseDecoder()
	r.stop()
	_ = r.st.Close()
	return nil
}
