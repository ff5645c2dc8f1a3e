package transport

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/hashicorp/yamux"
	"github.com/klauspost/compress/zstd"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// A snapshot stream is a yamux stream that starts with a StreamOpen frame
// (kind snapshots, and its codec), sent as it is, followed by its body: the
// Snapshot records and one End record, compressed as one zstd stream when
// the codec is zstd. See docs/protocol.md.

// Encoders and decoders are pooled: a zstd encoder holds its tables and
// window, a decoder its history, and making one per stream would dominate
// the cost of a stream of small snapshots. Both run with concurrency 1:
// no goroutines, and the cores go to the streams themselves.
var (
	encoderPool = sync.Pool{New: func() any {
		e, err := zstd.NewWriter(nil,
			zstd.WithEncoderLevel(zstd.SpeedFastest),
			zstd.WithEncoderConcurrency(1),
			zstd.WithWindowSize(EncoderWindow),
			zstd.WithEncoderCRC(true),
		)
		if err != nil {
			panic("transport: zstd encoder: " + err.Error()) // the options are constant
		}
		return e
	}}
	decoderPool = sync.Pool{New: func() any {
		d, err := zstd.NewReader(nil,
			zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxWindow(DefaultDecoderMaxWindow),
			zstd.WithDecoderMaxMemory(DefaultDecoderMaxWindow),
		)
		if err != nil {
			panic("transport: zstd decoder: " + err.Error())
		}
		return d
	}}
)

// Buffer sizes of a snapshot stream.
const (
	streamBufSize = 64 << 10  // bufio on the yamux stream, each direction
	inlineQueues  = 16 << 10  // queues up to this size are copied into the record buffer
	keepBuf       = 256 << 10 // a record buffer larger than this is not kept
)

// SnapshotWriter writes (index, snapshot) records to one snapshot stream. It
// is not safe for concurrent use; open one stream per goroutine. Records are
// buffered (and compressed): Flush sends what was written so far, Close ends
// the stream.
type SnapshotWriter struct {
	link  *Link
	st    *yamux.Stream
	bw    *bufio.Writer
	enc   *zstd.Encoder // nil for CodecNone
	out   io.Writer     // enc or bw
	buf   []byte
	count uint32
	err   error // sticky
	stop  func()
	done  bool
}

// OpenSnapshotStream opens a snapshot stream to the peer, compressed with
// the link's codec. ctx bounds the stream's whole life: once it ends, writes
// fail. The caller must Close (or Abort) the writer.
func (l *Link) OpenSnapshotStream(ctx context.Context) (*SnapshotWriter, error) {
	const op = "open snapshot stream"
	if err := ctx.Err(); err != nil {
		return nil, opError(op, err)
	}
	st, err := l.sess.OpenStream()
	if err != nil {
		return nil, opError(op, l.ioErr(err))
	}
	w := &SnapshotWriter{link: l, st: st, bw: bufio.NewWriterSize(st, streamBufSize)}
	w.stop = watchStream(ctx, st.SetWriteDeadline)
	w.buf = appendFrame(w.buf, &streamOpen{Kind: StreamSnapshots, Codec: l.codec})
	if _, err := w.bw.Write(w.buf); err != nil {
		w.Abort()
		return nil, opError(op, l.ioErr(err))
	}
	w.out = w.bw
	if l.codec == CodecZstd {
		w.enc = encoderPool.Get().(*zstd.Encoder)
		w.enc.Reset(w.bw)
		w.out = w.enc
	}
	return w, nil
}

// Write appends the record (index, s). It fails with a *LimitError, before
// writing anything, when the record exceeds a limit the peer announced (its
// MaxSnapshot, MaxConnections or MaxMigration); the stream stays usable. Any
// other error is sticky: the stream is lost and Close returns it too.
func (w *SnapshotWriter) Write(index uint32, s *repair.Snapshot) error {
	const op = "snapshot write"
	if w.err != nil {
		return opError(op, w.err)
	}
	if w.done {
		return opError(op, ErrClosed)
	}
	// The record is encoded with its queues last (as snapshotTable orders
	// them), so that large queues go from the snapshot to the compressor
	// without a copy.
	r := record{index: index, snap: *s}
	rq, sq := s.RecvQueue, s.SendQueue
	r.snap.RecvQueue, r.snap.SendQueue = nil, nil
	b := append(w.buf[:0], 0, 0, 0, 0, byte(MsgSnapshot))
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
	if err := w.link.reserveSend(index, size); err != nil {
		return opError(op, fmt.Errorf("connection %d: %w", index, err))
	}
	putFrameLength(b, size)
	inline := len(rq)+len(sq) <= inlineQueues
	if len(rq) > 0 {
		b = appendHeader(b, tagRecvQueue, len(rq))
		if inline {
			b = append(b, rq...)
		} else {
			b = w.write(b, rq)
		}
	}
	if len(sq) > 0 {
		b = appendHeader(b, tagSendQueue, len(sq))
		if inline {
			b = append(b, sq...)
		} else {
			b = w.write(b, sq)
		}
	}
	w.write(b, nil)
	if cap(b) <= keepBuf {
		w.buf = b[:0]
	}
	if w.err != nil {
		return opError(op, w.err)
	}
	w.count++
	return nil
}

// write sends b and then p, and returns b emptied.
func (w *SnapshotWriter) write(b, p []byte) []byte {
	if w.err == nil && len(b) > 0 {
		_, w.err = w.out.Write(b)
	}
	if w.err == nil && len(p) > 0 {
		_, w.err = w.out.Write(p)
	}
	if w.err != nil {
		w.err = w.link.ioErr(w.err)
	}
	return b[:0]
}

// Flush sends every record written so far to the peer.
func (w *SnapshotWriter) Flush() error {
	const op = "snapshot flush"
	if w.err == nil && w.enc != nil {
		w.err = w.enc.Flush()
	}
	if w.err == nil {
		w.err = w.bw.Flush()
	}
	if w.err != nil {
		w.err = w.link.ioErr(w.err)
		return opError(op, w.err)
	}
	return nil
}

// Close writes the End record, flushes, and closes the stream for writing.
// The peer's reader then sees every record and a clean end. Close returns
// the writer's first error, if any; it releases the writer's resources in
// every case.
func (w *SnapshotWriter) Close() error {
	const op = "snapshot close"
	if w.done {
		return nil
	}
	if w.err == nil {
		w.write(appendFrame(w.buf[:0], &endRecord{Count: w.count}), nil)
	}
	if w.err == nil && w.enc != nil {
		if err := w.enc.Close(); err != nil {
			w.err = w.link.ioErr(err)
		}
	}
	if w.err == nil {
		if err := w.bw.Flush(); err != nil {
			w.err = w.link.ioErr(err)
		}
	}
	err := w.err
	w.release()
	if err != nil {
		return opError(op, err)
	}
	return nil
}

// Abort closes the stream without its End record: the peer's reader fails
// with ErrTruncated, and records still buffered here are dropped.
func (w *SnapshotWriter) Abort() {
	if w.err == nil {
		w.err = errAborted
	}
	w.release()
}

var errAborted = errors.New("transport: snapshot stream aborted")

func (w *SnapshotWriter) release() {
	if w.done {
		return
	}
	w.done = true
	if w.enc != nil {
		if w.err == nil {
			w.enc.Reset(nil)
			encoderPool.Put(w.enc)
		}
		w.enc = nil
	}
	w.stop()
	_ = w.st.Close()
	w.buf = nil
}

// Count returns the number of records written.
func (w *SnapshotWriter) Count() uint32 { return w.count }

// SnapshotReader reads the records of one snapshot stream. It is not safe
// for concurrent use. Each record is checked against this side's limits
// before it is read: its size, the link's count of connections and bytes,
// and its index (below MaxConnections, and new on this link).
type SnapshotReader struct {
	link   *Link
	st     *yamux.Stream
	br     *bufio.Reader
	dec    *zstd.Decoder // nil for CodecNone
	in     io.Reader     // dec or br
	opened bool          // the StreamOpen frame was read
	count  uint32
	err    error // sticky; io.EOF after the End record
	stop   func()
	closed bool
	hdr    [frameHeaderSize]byte
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
	r := &SnapshotReader{link: l, st: st, br: bufio.NewReaderSize(st, streamBufSize)}
	r.stop = watchStream(ctx, st.SetReadDeadline)
	return r, nil
}

// Next returns the next record: the connection's index and its snapshot,
// whose queues the caller owns. After the End record it returns io.EOF
// (unwrapped). An error is sticky: a stream that ended without its End
// record fails with ErrTruncated, a record over a limit with a *LimitError,
// a repeated index with ErrDuplicate, bad bytes with ErrMalformed.
func (r *SnapshotReader) Next() (uint32, *repair.Snapshot, error) {
	if r.err != nil {
		if r.err == io.EOF {
			return 0, nil, io.EOF
		}
		return 0, nil, opError("snapshot read", r.err)
	}
	if r.closed {
		return 0, nil, opError("snapshot read", ErrClosed)
	}
	index, s, err := r.next()
	if err != nil {
		if err != io.EOF {
			err = r.mapErr(err)
		}
		r.err = err
		r.releaseDecoder()
		if err == io.EOF {
			return 0, nil, io.EOF
		}
		return 0, nil, opError("snapshot read", err)
	}
	return index, s, nil
}

func (r *SnapshotReader) next() (uint32, *repair.Snapshot, error) {
	lim := &r.link.limits
	if !r.opened {
		if err := r.open(); err != nil {
			return 0, nil, err
		}
	}
	for {
		size, t, err := readHeader(r.in, &r.hdr)
		if err == io.EOF {
			return 0, nil, fmt.Errorf("%w: the stream ended after %d records without its end record", ErrTruncated, r.count)
		}
		if err != nil {
			return 0, nil, err
		}
		switch {
		case t == MsgSnapshot:
			if err := checkSize("snapshot size", size, lim.MaxSnapshot); err != nil {
				return 0, nil, err
			}
			if err := r.link.admit(size); err != nil {
				return 0, nil, err
			}
			// A fresh buffer per record: the snapshot's queues alias it.
			body, err := readBody(r.in, int(size-1), nil)
			if err != nil {
				return 0, nil, err
			}
			index, s, err := decodeSnapshot(body)
			if err != nil {
				return 0, nil, err
			}
			if err := r.link.admitIndex(index); err != nil {
				return 0, nil, err
			}
			r.count++
			return index, s, nil
		case t == MsgEnd || t >= msgAncillary:
			if err := checkSize("frame size", size, lim.MaxFrame); err != nil {
				return 0, nil, err
			}
			body, err := readBody(r.in, int(size-1), nil)
			if err != nil {
				return 0, nil, err
			}
			m, err := decodeMessage(phaseSnapshot, t, body)
			if err == errSkip {
				continue
			}
			if err != nil {
				return 0, nil, err
			}
			if end := m.(*endRecord); end.Count != r.count {
				return 0, nil, malformedf("end record counts %d records, the stream carried %d", end.Count, r.count)
			}
			return 0, nil, r.finish()
		default:
			return 0, nil, unexpected(t, phaseSnapshot)
		}
	}
}

// open reads the StreamOpen frame and sets up the decoder.
func (r *SnapshotReader) open() error {
	m, err := readMessage(r.br, phaseStream, r.link.limits.MaxFrame, "frame size", nil)
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
	r.opened = true
	r.in = r.br
	if so.Codec == CodecZstd {
		w := r.link.limits.DecoderMaxWindow
		r.dec = decoderPool.Get().(*zstd.Decoder)
		if err := r.dec.ResetWithOptions(r.br, zstd.WithDecoderMaxWindow(w), zstd.WithDecoderMaxMemory(w)); err != nil {
			return fmt.Errorf("zstd: %w", err)
		}
		r.in = r.dec
	}
	return nil
}

// finish checks that the body ends right after the End record (which also
// makes the zstd decoder verify the frame's checksum).
func (r *SnapshotReader) finish() error {
	var one [1]byte
	n, err := io.ReadFull(r.in, one[:])
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
	case errors.Is(err, zstd.ErrWindowSizeExceeded), errors.Is(err, zstd.ErrDecoderSizeExceeded):
		return &LimitError{Limit: "decoder window", Max: r.link.limits.DecoderMaxWindow}
	case errors.Is(err, yamux.ErrTimeout):
		return fmt.Errorf("stream deadline: %w", context.DeadlineExceeded)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: %v", ErrTruncated, err)
	case errors.Is(err, ErrTruncated):
		return err
	}
	if r.dec != nil {
		// Anything else from inside the decoder is corrupt input.
		return malformedf("zstd: %v", err)
	}
	return err
}

func (r *SnapshotReader) releaseDecoder() {
	if r.dec == nil {
		return
	}
	if r.err == io.EOF {
		_ = r.dec.Reset(nil)
		decoderPool.Put(r.dec)
	}
	r.dec = nil
	r.in = nil
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
