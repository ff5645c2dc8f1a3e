package transport

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/hashicorp/yamux"
)

// Control is the control stream of a link: typed handoff messages, in
// order, in both directions.
//
// Send may be called from many goroutines; Recv from one at a time (calls
// are serialised). A Send or Recv canceled by its context in the middle of
// a frame leaves the stream out of step: later calls fail with ErrBroken,
// and the migration must be aborted by closing the link. A Recv canceled
// while no byte of the next frame had arrived leaves the stream usable.
type Control struct {
	link *Link
	st   *yamux.Stream

	sendMu  sync.Mutex // guards sendBuf, sendErr and writes to st
	sendBuf []byte
	sendErr error // sticky

	recvMu  sync.Mutex // guards br, recvBuf, recvErr and reads from st
	br      *bufio.Reader
	recvBuf []byte
	recvErr error // sticky
}

func newControl(l *Link, st *yamux.Stream) *Control {
	return &Control{link: l, st: st, br: bufio.NewReaderSize(st, 16<<10)}
}

// Send sends one control message, or several in order: those of one call
// go in one write to the stream, and so, when they fit in one frame of
// yamux (the stream's window permitting), in one record and one segment,
// which the peer reads with one wake-up. It fails with a *LimitError,
// before sending anything, if a message is larger than the peer's MaxFrame
// (send large verdict lists in several Verdicts messages), and with
// ErrUnexpected for a message that does not belong on the control stream
// (Hello, Accept, Reject).
func (c *Control) Send(ctx context.Context, m Message, more ...Message) error {
	const op = "control send"
	ms := append([]Message{m}, more...)
	for _, m := range ms {
		if t := m.Type(); int(t) >= len(msgTable) || msgTable[t].phase != phaseControl {
			return opError(op, unexpected(t, phaseControl))
		}
	}
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	if c.sendErr == errSendClosed {
		return opError(op, c.sendErr)
	}
	if c.sendErr != nil {
		return opError(op, fmt.Errorf("%w: %w", ErrBroken, c.sendErr))
	}
	b := c.sendBuf[:0]
	for _, m := range ms {
		start := len(b)
		b = appendFrame(b, m)
		size := uint32(len(b) - start - 4)
		if err := checkSize("peer's frame size", size, c.link.peer.Limits.MaxFrame); err != nil {
			return opError(op, fmt.Errorf("%s: %w", m.Type(), err))
		}
	}
	if cap(b) <= 64<<10 {
		c.sendBuf = b
	}
	stop := watchStream(ctx, c.st.SetWriteDeadline)
	n, err := c.st.Write(b)
	stop()
	if err != nil {
		err = c.streamErr(ctx, err)
		if n > 0 {
			// Part of the frames went out: the peer's reader is out of step.
			c.sendErr = err
		}
		return opError(op, fmt.Errorf("%s: %w", typesOf(ms), err))
	}
	return nil
}

// typesOf names the types of ms, for an error.
func typesOf(ms []Message) string {
	s := ms[0].Type().String()
	for _, m := range ms[1:] {
		s += "+" + m.Type().String()
	}
	return s
}

// Close closes the control stream for sending, after the messages already
// sent: the peer's Recv returns an error matching io.EOF once it has read
// them. This side can still Recv. Closing the Link ends both directions at
// once.
func (c *Control) Close() error {
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	if c.sendErr == nil {
		c.sendErr = errSendClosed
	}
	return opError("control close", c.link.ioErr(c.st.Close()))
}

var errSendClosed = fmt.Errorf("%w: the control stream is closed for sending", ErrClosed)

// Recv waits for the next control message and returns it: one of *Prepare,
// *Verdicts, *Prepared, *Switch, *Switched, *Commit, *Committed, *Abort,
// *Query or *Outcome. When the peer closes the control stream it returns an
// error matching io.EOF; when the link is lost, one matching ErrPeerLost.
func (c *Control) Recv(ctx context.Context) (Message, error) {
	const op = "control recv"
	c.recvMu.Lock()
	defer c.recvMu.Unlock()
	if c.recvErr != nil {
		return nil, opError(op, fmt.Errorf("%w: %w", ErrBroken, c.recvErr))
	}
	stop := watchStream(ctx, c.st.SetReadDeadline)
	defer stop()
	// Wait for the first byte without consuming it: until it arrives, a
	// canceled or failed Recv leaves the stream in step.
	if _, err := c.br.Peek(1); err != nil {
		if errors.Is(err, io.EOF) && c.link.Err() == nil {
			return nil, opError(op, fmt.Errorf("the peer closed the control stream: %w", io.EOF))
		}
		return nil, opError(op, c.streamErr(ctx, err))
	}
	if c.recvBuf == nil {
		c.recvBuf = make([]byte, 0, 4<<10)
	}
	m, err := readMessage(c.br, phaseControl, c.link.limits.MaxFrame, "frame size", c.recvBuf)
	if err != nil {
		err = c.streamErr(ctx, err)
		c.recvErr = err
		return nil, opError(op, err)
	}
	return m, nil
}

// streamErr maps an error of the control stream.
func (c *Control) streamErr(ctx context.Context, err error) error {
	if ctx.Err() != nil && errors.Is(err, yamux.ErrTimeout) {
		return ctx.Err()
	}
	if errors.Is(err, yamux.ErrTimeout) {
		return context.DeadlineExceeded
	}
	return c.link.ioErr(err)
}
