package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// Link is one authenticated connection between a source and a target agent,
// carrying one migration: a control stream and any number of snapshot
// streams, multiplexed by yamux over TLS.
//
// A Link is safe for concurrent use: many goroutines may open and accept
// snapshot streams while another uses the control stream. Close ends every
// stream; a lost peer ends them too, within about KeepAliveInterval +
// KeepAliveTimeout.
type Link struct {
	conn        *watchConn
	sess        *yamux.Session
	ctrl        *Control
	peer        *Hello
	local       *Hello
	version     uint16
	codec       Codec
	compression Compression
	limits      Limits
	tls         *tls.ConnectionState

	closing atomic.Bool // Close was called

	sent struct { // what this side sent, against the peer's limits
		records atomic.Uint64
		bytes   atomic.Uint64
	}

	mu      sync.Mutex // guards the fields below
	records uint64     // snapshot records received
	bytes   uint64     // their decoded bytes
	seen    []uint64   // bitmap of connection indices received (final or confirmed)
	pre     []uint64   // bitmap of connection indices whose pre-copy was received
	detail  string     // first error yamux reported, for Err
}

// Dial connects to a target agent at addr ("host:port"), runs the TLS and
// protocol handshake, and returns the Link. ctx bounds the dial and the
// handshake; it does not bound the Link.
func Dial(ctx context.Context, addr string, cfg *Config) (*Link, error) {
	s, err := cfg.settings()
	if err != nil {
		return nil, opError("dial "+addr, err)
	}
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, s.handshakeTimeout)
	conn, err := d.DialContext(dctx, "tcp", addr)
	cancel()
	if err != nil {
		return nil, opError("dial "+addr, err)
	}
	l, err := newLink(ctx, conn, s, true, hostOf(addr))
	if err != nil {
		conn.Close()
		return nil, opError("dial "+addr, err)
	}
	return l, nil
}

// Client runs the dialing side of the protocol on an established connection
// and returns the Link, which owns conn from then on. The server's
// certificate must name the host of conn's remote address unless
// cfg.TLS.ServerName says otherwise. On error conn is closed.
func Client(ctx context.Context, conn net.Conn, cfg *Config) (*Link, error) {
	op := "client handshake with " + conn.RemoteAddr().String()
	s, err := cfg.settings()
	if err != nil {
		conn.Close()
		return nil, opError(op, err)
	}
	l, err := newLink(ctx, conn, s, true, hostOf(conn.RemoteAddr().String()))
	if err != nil {
		conn.Close()
		return nil, opError(op, err)
	}
	return l, nil
}

// Server runs the accepting side of the protocol on an established
// connection and returns the Link, which owns conn from then on. On error
// conn is closed.
func Server(ctx context.Context, conn net.Conn, cfg *Config) (*Link, error) {
	op := "accept from " + conn.RemoteAddr().String()
	s, err := cfg.settings()
	if err != nil {
		conn.Close()
		return nil, opError(op, err)
	}
	l, err := newLink(ctx, conn, s, false, "")
	if err != nil {
		conn.Close()
		return nil, opError(op, err)
	}
	return l, nil
}

// Listener accepts links from source agents.
type Listener struct {
	ln net.Listener
	s  *settings
}

// Listen listens on the TCP address addr ("host:port"; port 0 picks one).
func Listen(addr string, cfg *Config) (*Listener, error) {
	s, err := cfg.settings()
	if err != nil {
		return nil, opError("listen "+addr, err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, opError("listen "+addr, err)
	}
	return &Listener{ln: ln, s: s}, nil
}

// NewListener returns a Listener that accepts connections from ln (such as
// a socket inherited from systemd) and runs the protocol on them.
func NewListener(ln net.Listener, cfg *Config) (*Listener, error) {
	s, err := cfg.settings()
	if err != nil {
		return nil, opError("listen "+ln.Addr().String(), err)
	}
	return &Listener{ln: ln, s: s}, nil
}

// Accept waits for a connection and runs the handshake on it, within the
// Config's HandshakeTimeout. A failed handshake returns an error and leaves
// the Listener open: the caller reports it and accepts again. Once the
// Listener is closed, Accept returns an error matching net.ErrClosed.
func (ln *Listener) Accept() (*Link, error) {
	conn, err := ln.ln.Accept()
	if err != nil {
		return nil, opError("accept", err)
	}
	l, err := newLink(context.Background(), conn, ln.s, false, "")
	if err != nil {
		conn.Close()
		return nil, opError("accept from "+conn.RemoteAddr().String(), err)
	}
	return l, nil
}

// Addr returns the address the Listener listens on.
func (ln *Listener) Addr() net.Addr { return ln.ln.Addr() }

// Close stops listening; Links already accepted stay up.
func (ln *Listener) Close() error { return ln.ln.Close() }

// yamuxConfig returns the yamux configuration of a link.
func (s *settings) yamuxConfig(logger yamux.Logger) *yamux.Config {
	c := yamux.DefaultConfig()
	c.AcceptBacklog = 64
	c.EnableKeepAlive = true
	c.KeepAliveInterval = s.keepAlive
	// yamux waits this long for a ping's answer and for any frame to be
	// written before it declares the connection dead.
	c.ConnectionWriteTimeout = s.kaTimeout
	c.MaxStreamWindowSize = streamWindow
	// A stream the peer has not accepted yet is not a sign of a dead peer
	// (the keepalive is); never tear the session down for it.
	c.StreamOpenTimeout = 0
	c.StreamCloseTimeout = time.Minute
	c.LogOutput = nil
	c.Logger = logger
	return c
}

// streamWindow is the largest yamux receive window of a stream: how much of
// one stream may be in flight.
const streamWindow = 1 << 20

func newLink(ctx context.Context, conn net.Conn, s *settings, client bool, serverName string) (*Link, error) {
	var (
		res *handshakeResult
		err error
	)
	if client {
		res, err = clientHandshake(ctx, conn, s, serverName)
	} else {
		res, err = serverHandshake(ctx, conn, s)
	}
	if err != nil {
		return nil, err
	}
	l := &Link{
		conn:        &watchConn{Conn: res.conn},
		peer:        res.peer,
		local:       s.hello(),
		version:     res.version,
		codec:       res.codec,
		compression: s.cfg.Compression,
		limits:      s.limits,
	}
	if tc, ok := res.conn.(*tls.Conn); ok {
		st := tc.ConnectionState()
		l.tls = &st
	}
	// yamux writes a frame's header and body apart: coalesceConn makes them
	// one TLS record.
	yc := &coalesceConn{watchConn: l.conn}
	if client {
		l.sess, err = yamux.Client(yc, s.yamuxConfig(linkLogger{l}))
	} else {
		l.sess, err = yamux.Server(yc, s.yamuxConfig(linkLogger{l}))
	}
	if err != nil {
		return nil, err
	}
	if err := l.openControl(ctx, s, client); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// openControl sets up the control stream: the client opens it first, the
// server accepts it as the first stream.
func (l *Link) openControl(ctx context.Context, s *settings, client bool) error {
	ctx, cancel := context.WithTimeout(ctx, s.handshakeTimeout)
	defer cancel()
	var (
		st  *yamux.Stream
		err error
	)
	if client {
		st, err = l.sess.OpenStream()
		if err != nil {
			return l.ioErr(err)
		}
		b := appendFrame(nil, &streamOpen{Kind: StreamControl})
		if _, err := st.Write(b); err != nil {
			return l.ioErr(err)
		}
	} else {
		st, err = l.sess.AcceptStreamWithContext(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("%w: no control stream from the peer within %v", ErrTimeout, s.handshakeTimeout)
			}
			return l.ioErr(err)
		}
		stop := watchStream(ctx, st.SetReadDeadline)
		m, err := readMessage(st, phaseStream, l.limits.MaxFrame, "frame size", nil)
		stop()
		if err != nil {
			return l.ioErr(err)
		}
		if so := m.(*streamOpen); so.Kind != StreamControl {
			return fmt.Errorf("%w: the first stream is of kind %d, not control", ErrUnexpected, so.Kind)
		}
	}
	l.ctrl = newControl(l, st)
	return nil
}

// Control returns the link's control stream.
func (l *Link) Control() *Control { return l.ctrl }

// Peer returns the peer's Hello: its kernel features, codecs and limits
// (with defaults filled in). The caller must not modify it.
func (l *Link) Peer() *Hello { return l.peer }

// Local returns the Hello this side sent. The caller must not modify it.
func (l *Link) Local() *Hello { return l.local }

// Version returns the protocol version the link runs.
func (l *Link) Version() uint16 { return l.version }

// Codec returns the codec negotiated for snapshot streams: CodecZstd unless
// either side asked for CompressNever. With CodecZstd, each chunk is
// compressed or not as the sender's Compression mode decides.
func (l *Link) Codec() Codec { return l.codec }

// TLSState returns the TLS connection state (the peer's verified
// certificates, for authorisation), and false for an insecure link.
func (l *Link) TLSState() (tls.ConnectionState, bool) {
	if l.tls == nil {
		return tls.ConnectionState{}, false
	}
	return *l.tls, true
}

// LocalAddr returns the local address of the connection.
func (l *Link) LocalAddr() net.Addr { return l.conn.LocalAddr() }

// RemoteAddr returns the peer's address.
func (l *Link) RemoteAddr() net.Addr { return l.conn.RemoteAddr() }

// Done returns a channel that is closed when the link has ended, by Close
// or because the peer was lost.
func (l *Link) Done() <-chan struct{} { return l.sess.CloseChan() }

// Err returns nil while the link is up. Once it has ended it returns an
// error matching ErrClosed if this side closed it, else one matching
// ErrPeerLost that says what was seen (the connection's error, or yamux's
// reason such as a keepalive timeout).
func (l *Link) Err() error {
	if l.sess == nil || !l.sess.IsClosed() { // no session: a codec test's Link
		return nil
	}
	if l.closing.Load() {
		return ErrClosed
	}
	l.mu.Lock()
	detail := l.detail
	l.mu.Unlock()
	if ioErr := l.conn.err(); ioErr != nil {
		if errors.Is(ioErr, io.EOF) {
			return fmt.Errorf("%w: the peer closed the connection", ErrPeerLost)
		}
		return fmt.Errorf("%w: %v", ErrPeerLost, ioErr)
	}
	if detail != "" {
		return fmt.Errorf("%w: %s", ErrPeerLost, detail)
	}
	return ErrPeerLost
}

// Close ends the link and every stream on it at once. Buffered data not yet
// read by the peer is lost: close snapshot streams and finish the control
// exchange first.
func (l *Link) Close() error {
	l.closing.Store(true)
	return l.sess.Close()
}

// ioErr maps a stream error: once the session has ended, the link's error
// says why better than the stream's.
func (l *Link) ioErr(err error) error {
	if err == nil {
		return nil
	}
	if lerr := l.Err(); lerr != nil {
		return lerr
	}
	return err
}

// admit accounts for a received snapshot record of size bytes, before it is
// read, against the link's limits.
func (l *Link) admit(size uint32) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.bytes+uint64(size) > l.limits.MaxMigration {
		return &LimitError{Limit: "migration bytes", Value: l.bytes + uint64(size), Max: l.limits.MaxMigration}
	}
	l.bytes += uint64(size)
	return nil
}

// admitIndex counts a received record against the connection limit and
// records its index and pass: each index may have one pre-copy, before one
// final or confirming record; a confirmation needs the pre-copy;
// pre-copies need version 3. A pre-copy is not one of the link's records
// (the bitmap bounds them).
func (l *Link) admitIndex(i uint32, pass Pass) error {
	if i >= l.limits.MaxConnections {
		return &LimitError{Limit: "connection index", Value: uint64(i), Max: uint64(l.limits.MaxConnections) - 1}
	}
	if pass != PassFinal && l.version < 3 {
		return malformedf("snapshot %d: a %s record on a link of version %d", i, pass, l.version)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if pass != PassPre && l.records+1 > uint64(l.limits.MaxConnections) {
		return &LimitError{Limit: "connections", Value: l.records + 1, Max: uint64(l.limits.MaxConnections)}
	}
	w, bit := int(i/64), uint64(1)<<(i%64)
	if w >= len(l.seen) {
		l.seen = append(l.seen, make([]uint64, w+1-len(l.seen))...)
	}
	if pass == PassPre && w >= len(l.pre) {
		l.pre = append(l.pre, make([]uint64, w+1-len(l.pre))...)
	}
	final, pre := l.seen[w]&bit != 0, w < len(l.pre) && l.pre[w]&bit != 0
	switch {
	case final:
		return fmt.Errorf("%w: %d", ErrDuplicate, i)
	case pass == PassPre && pre:
		return fmt.Errorf("%w: a second pre-copy of %d", ErrDuplicate, i)
	case pass == PassConfirm && !pre:
		return malformedf("snapshot %d: a confirmation without a pre-copy", i)
	}
	if pass == PassPre {
		l.pre[w] |= bit
		return nil
	}
	l.records++
	l.seen[w] |= bit
	return nil
}

// reserveSend accounts for a snapshot record this side is about to send,
// against the peer's limits, so that a record the peer would refuse fails
// here with a clear error instead.
func (l *Link) reserveSend(index uint32, pass Pass, size int) error {
	pl := &l.peer.Limits
	if uint64(size) > uint64(pl.MaxSnapshot) {
		return &LimitError{Limit: "peer's snapshot size", Value: uint64(size), Max: uint64(pl.MaxSnapshot)}
	}
	if index >= pl.MaxConnections {
		return &LimitError{Limit: "peer's connection index", Value: uint64(index), Max: uint64(pl.MaxConnections) - 1}
	}
	// A pre-copy is not one of the peer's records (admitIndex).
	records := uint64(1)
	if pass == PassPre {
		records = 0
	}
	if n := l.sent.records.Add(records); n > uint64(pl.MaxConnections) {
		l.sent.records.Add(-records)
		return &LimitError{Limit: "peer's connections", Value: n, Max: uint64(pl.MaxConnections)}
	}
	if n := l.sent.bytes.Add(uint64(size)); n > pl.MaxMigration {
		l.sent.bytes.Add(-uint64(size))
		l.sent.records.Add(-records)
		return &LimitError{Limit: "peer's migration bytes", Value: n, Max: pl.MaxMigration}
	}
	return nil
}

// watchConn is the connection under yamux; it keeps the first I/O error, so
// that Err can say why the link ended.
type watchConn struct {
	net.Conn
	mu    sync.Mutex
	first error
}

func (c *watchConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil {
		c.keep(err)
	}
	return n, err
}

func (c *watchConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if err != nil {
		c.keep(err)
	}
	return n, err
}

func (c *watchConn) keep(err error) {
	if errors.Is(err, net.ErrClosed) {
		return // closed by yamux: the cause is elsewhere
	}
	c.mu.Lock()
	if c.first == nil {
		c.first = err
	}
	c.mu.Unlock()
}

func (c *watchConn) err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.first
}

// linkLogger receives yamux's log lines. Nothing is printed; the first line
// is kept as the reason the session ended, for Err.
type linkLogger struct{ l *Link }

func (g linkLogger) Print(v ...any) { g.keep(fmt.Sprint(v...)) }

func (g linkLogger) Printf(format string, v ...any) { g.keep(fmt.Sprintf(format, v...)) }

func (g linkLogger) Println(v ...any) { g.keep(fmt.Sprint(v...)) }

func (g linkLogger) keep(s string) {
	s = strings.TrimPrefix(strings.TrimPrefix(s, "[ERR] "), "[WARN] ")
	g.l.mu.Lock()
	if g.l.detail == "" {
		g.l.detail = s
	}
	g.l.mu.Unlock()
}

// watchStream applies ctx to a stream's deadline (read, write or both) and
// returns the function that stops watching and clears the deadline.
func watchStream(ctx context.Context, set func(time.Time) error) (stop func()) {
	if d, ok := ctx.Deadline(); ok {
		_ = set(d)
	}
	if ctx.Done() == nil {
		return func() { _ = set(time.Time{}) }
	}
	fired := make(chan struct{})
	stopf := context.AfterFunc(ctx, func() {
		_ = set(time.Unix(1, 0))
		close(fired)
	})
	return func() {
		if !stopf() {
			<-fired
		}
		_ = set(time.Time{})
	}
}
