package fdpass

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/activation"
)

// Conn is one end of a handoff connection, from Dial or Listener.Accept.
//
// One goroutine may receive while another sends. Sends are serialised with
// each other, so the frames of a batch are never interleaved with another
// message, and receives likewise. After a receive error (other than a
// timeout before any byte of a message arrived) every receive returns that
// error and every send fails; after a send error (other than a message
// refused before any byte was written) every send returns it.
type Conn struct {
	uc   *net.UnixConn
	raw  syscall.RawConn
	path string // the socket file, for error messages
	peer Cred
	lim  Limits // what this side accepts, resolved

	rmu      sync.Mutex // guards the read side: rerr, oob, gotHello
	rerr     error
	oob      []byte
	gotHello bool

	wmu  sync.Mutex // guards the write side: werr
	werr error

	// readFailed is the sticky receive error (rerr), published to senders:
	// once the read side has failed, nothing more is sent.
	readFailed atomic.Pointer[OpError]

	pmu     sync.Mutex // guards peerLim
	peerLim Limits

	closeOnce sync.Once
	closeErr  error
}

// op names an operation on this connection in errors.
func (c *Conn) op(verb string) string { return verb + " on " + c.path }

// oobLen is room for the largest SCM_RIGHTS message one recvmsg returns: the
// kernel hands over the descriptors of at most one sendmsg per call, and a
// sendmsg carries at most SCM_MAX_FD of them.
var oobLen = unix.CmsgSpace(MaxFDsPerFrame * 4)

func newConn(uc *net.UnixConn, path string, peer Cred, lim Limits) (*Conn, error) {
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	return &Conn{
		uc:      uc,
		raw:     raw,
		path:    path,
		peer:    peer,
		lim:     lim.resolve(),
		oob:     make([]byte, oobLen),
		peerLim: Limits{}.resolve(), // until the peer's hello says otherwise
	}, nil
}

// Peer returns the credentials of the process at the other end, as the
// kernel recorded them when the connection was made (for a dialer: when the
// listener called listen).
func (c *Conn) Peer() Cred { return c.peer }

// PeerLimits returns the limits the peer announced in its hello (the
// defaults until its hello has been read). Sends are checked against them.
func (c *Conn) PeerLimits() Limits {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	return c.peerLim
}

func (c *Conn) setPeerLimits(l Limits) {
	c.pmu.Lock()
	c.peerLim = l
	c.pmu.Unlock()
}

// SetDeadline sets the deadline of every send and receive, as
// net.Conn.SetDeadline does. A receive that times out before any byte of a
// message arrived can be retried; any other timeout breaks the connection.
func (c *Conn) SetDeadline(t time.Time) error { return c.uc.SetDeadline(t) }

// SetReadDeadline sets the deadline of receives.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.uc.SetReadDeadline(t) }

// SetWriteDeadline sets the deadline of sends.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.uc.SetWriteDeadline(t) }

// Close closes the connection. Items already received stay open. It is safe
// to call more than once; later calls return the first call's result.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.uc.Close() })
	return c.closeErr
}

// SendSockets sends items as one message of KindSockets, split into as many
// frames as needed (at most MaxFDsPerFrame sockets each). The message is
// checked against the peer's limits first; if it does not fit, nothing is
// sent and the error wraps ErrTooLarge (or ErrInvalid for a nil File or a
// duplicate ID). The items stay the caller's.
func (c *Conn) SendSockets(items []Item) error {
	return c.sendBatch(c.op("send sockets"), KindSockets, items, false)
}

// SendSocketsLive is SendSockets for a sender that keeps serving the
// sockets after handing them over: the receiver (a source agent) inspects
// them while they are still in use and, before it locks them, sends
// KindPause with their IDs. From then on the sender must not read, write,
// shut down or set an option on them, and it answers with SendPaused. It
// keeps its own descriptors, as after SendSockets, until each socket is
// committed (it closes them then: the agent's copy is in repair mode, so
// nothing is sent) or handed back: if the hand-over connection fails in
// between, they are what keeps the sockets alive. A socket not named by a
// pause stays the sender's to serve; it may still come back in a
// HAND-BACK, as a second descriptor of a socket the sender holds.
func (c *Conn) SendSocketsLive(items []Item) error {
	return c.sendBatch(c.op("send sockets"), KindSockets, items, true)
}

// HandBack returns items to the peer that handed them over, as a message of
// KindHandBack: their migration rolled back and the peer owns them again.
// It is otherwise like SendSockets.
func (c *Conn) HandBack(items []Item) error {
	return c.sendBatch(c.op("hand back"), KindHandBack, items, false)
}

// SendCommitted tells the peer that the connections with these IDs were
// migrated: it must forget them (close its descriptors without shutting the
// connections down).
func (c *Conn) SendCommitted(ids []uint64) error {
	return c.sendIDs(c.op("send committed"), KindCommitted, ids)
}

// SendAck tells the peer that this side has taken over the sockets with
// these IDs.
func (c *Conn) SendAck(ids []uint64) error {
	return c.sendIDs(c.op("send ack"), KindAck, ids)
}

// SendPause asks the sender of a live message of sockets to stop using the
// sockets with these IDs; it answers with KindPaused (RecvPaused).
func (c *Conn) SendPause(ids []uint64) error {
	return c.sendIDs(c.op("send pause"), KindPause, ids)
}

// DefaultPauseTimeout is how long an agent waits for a live program's
// answer to a pause (`send --handoff`, and the bench's source agent).
const DefaultPauseTimeout = 10 * time.Second

// Pause asks the sender of a live message of sockets to stop using the
// sockets with these IDs (SendPause) and waits up to timeout for its
// answer (RecvPaused), which must name the same IDs, in any order. It
// returns each socket's state as of the pause, in the order of ids.
func (c *Conn) Pause(ctx context.Context, ids []uint64, timeout time.Duration) ([][]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, &OpError{Op: c.op("pause"), Err: err}
	}
	if err := c.SendPause(ids); err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	// A cancelled ctx ends the wait as the timeout would, and is reported
	// as the context's error (as Dial does).
	stop := context.AfterFunc(ctx, func() { c.SetReadDeadline(time.Now()) })
	got, err := c.RecvPaused()
	if !stop() {
		return nil, &OpError{Op: c.op("pause"), Err: ctx.Err()}
	}
	if err != nil {
		return nil, err
	}
	mismatch := &OpError{Op: c.op("pause"), Err: fmt.Errorf("%w: the answer to a pause of %d sockets names %d, not the same", ErrUnexpected, len(ids), len(got))}
	if len(got) != len(ids) { // also an answer to a pause of none
		return nil, mismatch
	}
	byID := make(map[uint64][]byte, len(got))
	for _, it := range got {
		byID[it.ID] = it.State // IDs are distinct: receive checked
	}
	states := make([][]byte, len(ids))
	for i, id := range ids {
		st, ok := byID[id]
		if !ok {
			return nil, mismatch
		}
		states[i] = st
	}
	return states, nil
}

// PauseItems is Pause for the items at idx (indices into items, such as
// source.Config.Pause is given): it pauses them by ID and, once they are
// paused, stores each one's state as of the pause in its State, so that a
// HAND-BACK of them after a rollback carries that state and not the one
// they were handed over with. It returns the states in the order of idx.
func (c *Conn) PauseItems(ctx context.Context, items []Item, idx []int, timeout time.Duration) ([][]byte, error) {
	ids := make([]uint64, len(idx))
	for i, j := range idx {
		if j < 0 || j >= len(items) {
			return nil, &OpError{Op: c.op("pause"), Err: fmt.Errorf("%w: index %d of %d sockets", ErrInvalid, j, len(items))}
		}
		ids[i] = items[j].ID
	}
	states, err := c.Pause(ctx, ids, timeout)
	if err != nil {
		return nil, err
	}
	for i, j := range idx {
		items[j].State = states[i]
	}
	return states, nil
}

// SendPaused answers a pause: items name the paused sockets by ID (their
// File must be nil, their addresses and names are not sent), each with
// the application's state as of the pause (State, at most the peer's
// Limits.MaxState). The sockets are no longer used; this side keeps its
// descriptors of them until they are committed or handed back.
func (c *Conn) SendPaused(items []Item) error {
	op := c.op("send paused")
	recs := make([]Item, len(items))
	for i, it := range items {
		if it.File != nil {
			return &OpError{Op: op, Err: fmt.Errorf("%w: socket %d: a paused record carries no descriptor", ErrInvalid, it.ID)}
		}
		recs[i] = Item{ID: it.ID, State: it.State}
	}
	return c.sendBatch(op, KindPaused, recs, false)
}

// SendError sends an error frame reporting err and ends the write side. The
// code is that of the sentinel error err matches (CodeTooLarge for
// ErrTooLarge, and so on), or CodeRejected; the message is err's text.
func (c *Conn) SendError(err error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.sendable(c.op("send error")); err != nil {
		return err
	}
	werr := c.write(appendError(nil, codeOf(err), err.Error()), nil)
	if werr != nil {
		c.werr = &OpError{Op: c.op("send error"), Err: werr}
		return c.werr
	}
	c.werr = &OpError{Op: c.op("send"), Err: fmt.Errorf("an error frame ended the connection: %w", net.ErrClosed)}
	return nil
}

// Receive reads the next message. A message of sockets spread over several
// frames is returned whole; if any frame of it is bad, every descriptor
// received for it is closed. The peer's hello is consumed on the way. An
// error frame from the peer is returned as a *RemoteError; a peer that
// closed the connection between messages gives an error matching io.EOF.
func (c *Conn) Receive() (Message, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.rerr != nil {
		return Message{}, c.rerr
	}
	m, consumed, err := c.receive()
	if err != nil {
		err = &OpError{Op: c.op("receive"), Err: err}
		if consumed || !errors.Is(err, os.ErrDeadlineExceeded) {
			c.rerr = err
			c.readFailed.Store(err.(*OpError))
			c.reportToPeer(err)
		}
	}
	return m, err
}

// RecvSockets receives a message and returns its sockets; any other message
// is an error wrapping ErrUnexpected (and its sockets, if any, are closed).
func (c *Conn) RecvSockets() ([]Item, error) {
	m, err := c.RecvSocketsMessage()
	return m.Items, err
}

// RecvSocketsMessage is RecvSockets returning the whole message, whose Live
// says whether the sender keeps serving the sockets (SendSocketsLive).
func (c *Conn) RecvSocketsMessage() (Message, error) {
	return c.recvKind("receive sockets", KindSockets)
}

// RecvAck receives a message and returns the IDs of an acknowledgement; any
// other message is an error wrapping ErrUnexpected (and its sockets, if any,
// are closed).
func (c *Conn) RecvAck() ([]uint64, error) {
	m, err := c.recvKind("receive ack", KindAck)
	return m.IDs, err
}

// RecvPaused receives a message and returns the records of a KindPaused,
// the answer to SendPause (items without a File); any other message is an
// error wrapping ErrUnexpected (and its sockets, if any, are closed).
func (c *Conn) RecvPaused() ([]Item, error) {
	m, err := c.recvKind("receive paused", KindPaused)
	return m.Items, err
}

// recvKind receives a message that must be of kind k.
func (c *Conn) recvKind(verb string, k Kind) (Message, error) {
	m, err := c.Receive()
	if err != nil {
		return Message{}, err
	}
	if m.Kind != k {
		CloseItems(m.Items)
		return Message{}, &OpError{Op: c.op(verb), Err: fmt.Errorf("%w: got a %s message", ErrUnexpected, m.Kind)}
	}
	return m, nil
}

// receive reads frames up to the end of one message. consumed says whether
// any byte of the message was read (a hello before it does not count).
func (c *Conn) receive() (m Message, consumed bool, err error) {
	var (
		batch      []Item
		batchBytes int
		seen       map[uint64]struct{}
	)
	fail := func(err error) (Message, bool, error) {
		CloseItems(batch)
		return Message{}, true, err
	}
	for {
		f, fds, cons, err := c.readFrame()
		consumed = consumed || cons
		if err != nil {
			CloseItems(batch)
			return Message{}, consumed, err
		}
		if f.kind == KindError { // whenever it comes, the peer's own word
			return fail(&RemoteError{Code: f.code, Message: f.msg})
		}
		if !c.gotHello && f.kind != KindHello {
			closeFDs(fds)
			return fail(fmt.Errorf("%w: a %s frame before the peer's hello", ErrUnexpected, f.kind))
		}
		if m.Kind != 0 && f.kind != m.Kind {
			closeFDs(fds)
			return fail(fmt.Errorf("%w: %s frame inside a %s message", ErrMalformed, f.kind, m.Kind))
		}
		switch f.kind {
		case KindHello:
			if c.gotHello {
				return fail(fmt.Errorf("%w: a second hello", ErrUnexpected))
			}
			c.gotHello = true
			c.setPeerLimits(f.limits)
			consumed = false // a whole frame: the stream is in step
		case KindCommitted, KindAck, KindPause:
			return Message{Kind: f.kind, IDs: f.ids}, consumed, nil
		case KindSockets, KindHandBack, KindPaused:
			if m.Kind != 0 && f.live != m.Live {
				closeFDs(fds)
				return fail(fmt.Errorf("%w: live and non-live frames in one %s message", ErrMalformed, f.kind))
			}
			m.Kind, m.Live = f.kind, f.live
			if err := c.checkBatchFrame(&f, len(batch), &batchBytes, &seen); err != nil {
				closeFDs(fds)
				return fail(err)
			}
			if err := checkTCP(fds); err != nil {
				closeFDs(fds)
				return fail(err)
			}
			for i := range fds { // none for KindPaused
				it := &f.items[i]
				it.File = os.NewFile(uintptr(fds[i]), fmt.Sprintf("fdpass:%d:%s->%s", it.ID, it.Local, it.Remote))
			}
			batch = append(batch, f.items...)
			if f.final {
				m.Items = batch
				return m, consumed, nil
			}
		}
	}
}

// checkBatchFrame checks a frame of sockets against the limits of the whole
// message and the distinctness of IDs, before its descriptors become files.
func (c *Conn) checkBatchFrame(f *frame, have int, bytes *int, seen *map[uint64]struct{}) error {
	if have+len(f.items) > c.lim.MaxBatch {
		return fmt.Errorf("%w: %s message of more than %d sockets", ErrTooLarge, f.kind, c.lim.MaxBatch)
	}
	if *seen == nil {
		*seen = make(map[uint64]struct{}, len(f.items))
	}
	for i := range f.items {
		*bytes += len(f.items[i].State)
		if _, dup := (*seen)[f.items[i].ID]; dup {
			return fmt.Errorf("%w: socket ID %d twice in one message", ErrMalformed, f.items[i].ID)
		}
		(*seen)[f.items[i].ID] = struct{}{}
	}
	if *bytes > c.lim.MaxBatchBytes {
		return fmt.Errorf("%w: %s message with more than %d state bytes", ErrTooLarge, f.kind, c.lim.MaxBatchBytes)
	}
	return nil
}

// checkTCP checks that every descriptor is a TCP socket.
func checkTCP(fds []int) error {
	for i, fd := range fds {
		dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
		if errors.Is(err, unix.ENOTSOCK) {
			return fmt.Errorf("%w: descriptor %d of the frame is not a socket", ErrNotTCP, i)
		}
		if err != nil {
			return os.NewSyscallError("getsockopt SO_DOMAIN", err)
		}
		proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
		if err != nil {
			return os.NewSyscallError("getsockopt SO_PROTOCOL", err)
		}
		if (dom != unix.AF_INET && dom != unix.AF_INET6) || proto != unix.IPPROTO_TCP {
			return fmt.Errorf("%w: descriptor %d of the frame is a socket of family %d, protocol %d", ErrNotTCP, i, dom, proto)
		}
	}
	return nil
}

// readFrame reads one frame and the descriptors that came with it; it
// closes them all on any error. consumed says whether any byte was read.
func (c *Conn) readFrame() (f frame, fds []int, consumed bool, err error) {
	defer func() {
		if err != nil {
			closeFDs(fds)
			fds = nil
		}
	}()
	var hb [HeaderLen]byte
	n, err := c.readFull(hb[:], &fds)
	consumed = n > 0
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = fmt.Errorf("%w: truncated frame: the connection closed after %d of %d header bytes: %w", ErrMalformed, n, HeaderLen, err)
	}
	if err != nil {
		return f, fds, consumed, err
	}
	h, err := parseHeader(hb[:])
	if err != nil {
		return f, fds, true, err
	}
	body := make([]byte, h.bodyLen) // bounded by parseHeader
	n, err = c.readFull(body, &fds)
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		err = fmt.Errorf("%w: truncated frame: the connection closed after %d of %d body bytes of a %s frame: %w", ErrMalformed, n, h.bodyLen, h.kind, io.ErrUnexpectedEOF)
	}
	if err != nil {
		return f, fds, true, err
	}
	if len(fds) != h.nfds {
		return f, fds, true, fmt.Errorf("%w: %s frame claims %d descriptors, %d arrived", ErrFDCount, h.kind, h.nfds, len(fds))
	}
	f, err = decodeBody(h, body, c.lim)
	return f, fds, true, err
}

// readFull fills p, appending every descriptor that arrives to *fds. It
// returns io.EOF if the peer closed before the first byte and
// io.ErrUnexpectedEOF if it closed later.
func (c *Conn) readFull(p []byte, fds *[]int) (int, error) {
	got := 0
	for got < len(p) {
		var n, oobn, flags int
		var serr error
		err := c.raw.Read(func(fd uintptr) bool {
			n, oobn, flags, _, serr = unix.Recvmsg(int(fd), p[got:], c.oob, unix.MSG_CMSG_CLOEXEC)
			return serr != unix.EAGAIN
		})
		if err != nil {
			return got, err
		}
		if serr == unix.EINTR {
			continue
		}
		if serr != nil {
			return got, os.NewSyscallError("recvmsg", serr)
		}
		if oobn > 0 {
			rights, perr := parseRights(c.oob[:oobn])
			*fds = append(*fds, rights...)
			if perr != nil {
				return got, perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			return got, fmt.Errorf("%w: control data truncated (is the descriptor table full?): descriptors were lost", ErrFDCount)
		}
		if n == 0 {
			if got == 0 {
				return 0, io.EOF
			}
			return got, io.ErrUnexpectedEOF
		}
		got += n
	}
	return got, nil
}

// parseRights returns the descriptors of every SCM_RIGHTS message in oob.
func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		// The kernel built this buffer; it cannot be malformed.
		return nil, os.NewSyscallError("parse control message", err)
	}
	var fds []int
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			return fds, os.NewSyscallError("parse SCM_RIGHTS", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// reportToPeer tells the peer, in an error frame, why this side stopped
// reading, when the cause is something the peer sent. It does not wait for
// a send in progress. The caller holds rmu.
func (c *Conn) reportToPeer(err error) {
	var re *RemoteError
	if errors.As(err, &re) {
		return // the peer knows
	}
	protocol := false
	for _, s := range []error{ErrMalformed, ErrVersion, ErrTooLarge, ErrFDCount, ErrNotTCP, ErrUnexpected} {
		protocol = protocol || errors.Is(err, s)
	}
	if !protocol || !c.wmu.TryLock() {
		return
	}
	defer c.wmu.Unlock()
	if c.werr != nil {
		return
	}
	c.uc.SetWriteDeadline(time.Now().Add(time.Second))
	c.write(appendError(nil, codeOf(err), err.Error()), nil)
}

// sendable returns why nothing more may be sent, or nil. The caller holds
// wmu.
func (c *Conn) sendable(op string) error {
	if c.werr != nil {
		return c.werr
	}
	if e := c.readFailed.Load(); e != nil {
		return &OpError{Op: op, Err: fmt.Errorf("the connection failed on receive: %w", e.Err)}
	}
	return nil
}

// checkItem reports what makes an item unencodable or unacceptable to a
// peer with limits lim.
func checkItem(k Kind, it *Item, lim Limits) error {
	if it.File == nil && kindInfo[k].fds {
		return fmt.Errorf("%w: socket %d has no file", ErrInvalid, it.ID)
	}
	for _, ap := range []netip.AddrPort{it.Local, it.Remote} {
		if len(ap.Addr().Zone()) > math.MaxUint8 {
			return fmt.Errorf("%w: socket %d: IPv6 zone longer than 255 bytes", ErrInvalid, it.ID)
		}
	}
	if len(it.State) > lim.MaxState {
		return fmt.Errorf("%w: socket %d: state blob of %d bytes, the peer accepts at most %d", ErrTooLarge, it.ID, len(it.State), lim.MaxState)
	}
	if it.Name != "" && !activation.ValidName(it.Name) {
		return fmt.Errorf("%w: socket %d: name %q is not 1 to %d bytes of [A-Za-z0-9._-]", ErrInvalid, it.ID, it.Name, activation.MaxNameLen)
	}
	return nil
}

// checkBatch checks a message of sockets against the peer's limits.
func checkBatch(k Kind, items []Item, lim Limits) error {
	if len(items) > lim.MaxBatch {
		return fmt.Errorf("%w: %d sockets, the peer accepts at most %d in one message", ErrTooLarge, len(items), lim.MaxBatch)
	}
	total := 0
	seen := make(map[uint64]struct{}, len(items))
	for i := range items {
		if err := checkItem(k, &items[i], lim); err != nil {
			return err
		}
		if _, dup := seen[items[i].ID]; dup {
			return fmt.Errorf("%w: socket ID %d twice in one message", ErrInvalid, items[i].ID)
		}
		seen[items[i].ID] = struct{}{}
		total += len(items[i].State)
	}
	if total > lim.MaxBatchBytes {
		return fmt.Errorf("%w: %d state bytes, the peer accepts at most %d in one message", ErrTooLarge, total, lim.MaxBatchBytes)
	}
	return nil
}

func (c *Conn) sendBatch(op string, k Kind, items []Item, live bool) error {
	if err := checkBatch(k, items, c.PeerLimits()); err != nil {
		return &OpError{Op: op, Err: err}
	}
	spans := planBatch(items)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.sendable(op); err != nil {
		return err
	}
	var buf []byte
	for i, s := range spans {
		buf = appendBatchFrameFlags(buf[:0], k, items, s, i == len(spans)-1, live)
		var sent []Item // KindPaused names sockets; it attaches none
		if kindInfo[k].fds {
			sent = items[s.start:s.end]
		}
		if err := withFDs(sent, nil, func(fds []int) error { return c.write(buf, fds) }); err != nil {
			c.werr = &OpError{Op: op, Err: err}
			return c.werr
		}
	}
	return nil
}

func (c *Conn) sendIDs(op string, k Kind, ids []uint64) error {
	lim := c.PeerLimits()
	if len(ids) > lim.MaxBatch {
		return &OpError{Op: op, Err: fmt.Errorf("%w: %d IDs, the peer accepts at most %d in one message", ErrTooLarge, len(ids), lim.MaxBatch)}
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.sendable(op); err != nil {
		return err
	}
	if err := c.write(appendIDs(nil, k, ids), nil); err != nil {
		c.werr = &OpError{Op: op, Err: err}
		return c.werr
	}
	return nil
}

// withFDs calls fn with the descriptors of the items' files, holding each
// file open (through its SyscallConn) for the duration, and without
// changing its blocking mode as File.Fd would.
func withFDs(items []Item, fds []int, fn func([]int) error) error {
	if len(items) == 0 {
		return fn(fds)
	}
	rc, err := items[0].File.SyscallConn()
	if err != nil {
		return fmt.Errorf("socket %d: %w", items[0].ID, err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = withFDs(items[1:], append(fds, int(fd)), fn) }); err != nil {
		return fmt.Errorf("socket %d: %w", items[0].ID, err)
	}
	return ferr
}

// write sends b, attaching fds (if any) to its first byte. The caller holds
// wmu.
func (c *Conn) write(b []byte, fds []int) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	for len(b) > 0 {
		var n int
		var serr error
		err := c.raw.Write(func(fd uintptr) bool {
			n, serr = unix.SendmsgN(int(fd), b, oob, nil, unix.MSG_NOSIGNAL)
			return serr != unix.EAGAIN
		})
		if err != nil {
			return err
		}
		if serr == unix.EINTR {
			continue
		}
		if serr != nil {
			return os.NewSyscallError("sendmsg", serr)
		}
		b, oob = b[n:], nil
	}
	return nil
}
