package transport

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"time"
)

// The handshake runs on the raw connection (inside TLS unless Insecure),
// before yamux starts, in a fixed order so that neither side ever writes
// while the other writes too (net.Pipe has no buffer):
//
//	client → server   preamble, Hello
//	server → client   preamble, Hello, Accept | Reject   (or preamble, Reject)
//	client → server   Accept | Reject
//
// Both sides run under one deadline (Config.HandshakeTimeout).

// tlsRecordHandshake is the first byte of every TLS ClientHello.
const tlsRecordHandshake = 0x16

// handshakeResult is what a successful handshake yields.
type handshakeResult struct {
	conn    net.Conn // the connection yamux runs on: TLS or the raw one
	peer    *Hello
	version uint16
	codec   Codec
}

func appendPreamble(b []byte) []byte {
	b = append(b, Magic[:]...)
	b = binary.BigEndian.AppendUint16(b, MinProtocolVersion)
	return binary.BigEndian.AppendUint16(b, ProtocolVersion)
}

func parsePreamble(p []byte) (lo, hi uint16, err error) {
	if !bytes.Equal(p[:4], Magic[:]) {
		return 0, 0, fmt.Errorf("%w: preamble % x", ErrBadMagic, p)
	}
	lo, hi = binary.BigEndian.Uint16(p[4:]), binary.BigEndian.Uint16(p[6:])
	if lo > hi || lo == 0 {
		return 0, 0, malformedf("preamble: version range %d..%d", lo, hi)
	}
	return lo, hi, nil
}

// evaluate decides whether this side accepts the peer, and on what terms.
func (s *settings) evaluate(lo, hi uint16, peer *Hello) (uint16, Codec, *Reject) {
	v := min(ProtocolVersion, hi)
	if v < max(MinProtocolVersion, lo) {
		return 0, 0, &Reject{Code: RejectVersion, Reason: fmt.Sprintf(
			"this side speaks protocol versions %d to %d, the peer %d to %d",
			MinProtocolVersion, ProtocolVersion, lo, hi)}
	}
	if missing := s.cfg.Require &^ peer.Features; missing != 0 {
		kernel := ""
		if peer.Kernel != "" {
			kernel = " (kernel " + peer.Kernel + ")"
		}
		return 0, 0, &Reject{Code: RejectFeature, Reason: fmt.Sprintf(
			"the peer%s lacks required kernel features: %s", kernel, missing)}
	}
	peer.Limits = peer.Limits.withDefaults()
	codec := CodecNone
	if s.cfg.Compression != CompressNever && peer.Accepts(CodecZstd) {
		codec = CodecZstd
	}
	return v, codec, nil
}

// watchDeadline applies ctx and a timeout to conn for the handshake. The
// returned function clears the deadline and reports ctx's error if ctx ended.
func watchDeadline(ctx context.Context, conn net.Conn, timeout time.Duration) func() error {
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = conn.SetDeadline(deadline)
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = conn.SetDeadline(time.Unix(1, 0))
		close(fired)
	})
	return func() error {
		if !stop() && ctx.Err() != nil {
			<-fired
			return ctx.Err()
		}
		_ = conn.SetDeadline(time.Time{})
		return nil
	}
}

// handshakeErr turns an I/O error of the handshake into a clear one.
func handshakeErr(err error, timeout time.Duration, waiting string) error {
	if errors.Is(err, ErrTLS) || errors.Is(err, ErrHandshake) {
		return err
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w: no %s from the peer within %v (is the peer a tcpmigrate agent, with the same TLS or insecure setting?)",
			ErrTimeout, waiting, timeout)
	}
	if _, ok := tlsAlert(err); ok {
		return tlsErr(err)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: the peer closed the connection while this side waited for its %s", ErrPeerLost, waiting)
	}
	return err
}

// tlsErr classifies a TLS handshake failure.
func tlsErr(err error) error {
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		if bytes.Equal(rh.RecordHeader[:4], Magic[:]) {
			return &HandshakeError{Remote: true, Code: RejectPlaintext,
				Reason: "the peer is a tcpmigrate agent in insecure (plaintext) mode; this side requires TLS"}
		}
		return fmt.Errorf("%w: the peer does not speak TLS (first bytes % x)", ErrBadMagic, rh.RecordHeader)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	var (
		cv *tls.CertificateVerificationError
		ua x509.UnknownAuthorityError
		ci x509.CertificateInvalidError
		hn x509.HostnameError
	)
	auth := errors.As(err, &cv) || errors.As(err, &ua) || errors.As(err, &ci) || errors.As(err, &hn)
	if code, ok := tlsAlert(err); ok {
		switch code {
		case 42, 43, 44, 45, 46, 48, 49, 116: // bad, unsupported, revoked, expired, unknown certificate; unknown CA; access denied; certificate required
			auth = true
		}
	}
	return &tlsError{auth: auth, err: err}
}

// tlsAlert returns the code of a TLS alert the peer sent. crypto/tls reports
// one as a *net.OpError with Op "remote error" whose Err is its unexported
// alert type (a uint8), or, over QUIC, as a tls.AlertError.
func tlsAlert(err error) (uint8, bool) {
	var ae tls.AlertError
	if errors.As(err, &ae) {
		return uint8(ae), true
	}
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "remote error" && oe.Err != nil {
		if v := reflect.ValueOf(oe.Err); v.Kind() == reflect.Uint8 {
			return uint8(v.Uint()), true
		}
	}
	return 0, false
}

func writeFrames(w io.Writer, preamble bool, msgs ...Message) error {
	var b []byte
	if preamble {
		b = appendPreamble(b)
	}
	for _, m := range msgs {
		b = appendFrame(b, m)
	}
	_, err := w.Write(b)
	return err
}

func readHandshake(r io.Reader) (Message, error) {
	return readMessage(r, phaseHandshake, HandshakeMaxFrame, "handshake frame size", nil)
}

// readPreamble reads the peer's preamble and returns its version range.
func (s *settings) readPreamble(c io.Reader) (lo, hi uint16, err error) {
	var pre [preambleSize]byte
	if _, err := io.ReadFull(c, pre[:]); err != nil {
		return 0, 0, handshakeErr(err, s.handshakeTimeout, "preamble")
	}
	return parsePreamble(pre[:])
}

// readVerdict reads the peer's verdict on our hello: nil for Accept, a
// remote *HandshakeError for Reject.
func (s *settings) readVerdict(c io.Reader) error {
	m, err := readHandshake(c)
	if err != nil {
		return handshakeErr(err, s.handshakeTimeout, "verdict on our hello")
	}
	switch m := m.(type) {
	case *Accept:
		return nil
	case *Reject:
		return &HandshakeError{Remote: true, Code: m.Code, Reason: m.Reason}
	default:
		return unexpected(m.Type(), phaseHandshake)
	}
}

// clientHandshake runs the dialing side's handshake on conn.
func clientHandshake(ctx context.Context, conn net.Conn, s *settings, serverName string) (res *handshakeResult, err error) {
	done := watchDeadline(ctx, conn, s.handshakeTimeout)
	defer func() {
		if cerr := done(); cerr != nil {
			err = cerr
		}
	}()
	c := conn
	if s.cfg.TLS != nil {
		tc := tls.Client(conn, s.clientTLS(serverName))
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, handshakeErr(tlsErr(err), s.handshakeTimeout, "TLS handshake")
		}
		c = tc
	}
	if err := writeFrames(c, true, s.hello()); err != nil {
		return nil, handshakeErr(err, s.handshakeTimeout, "reading of our hello")
	}
	lo, hi, err := s.readPreamble(c)
	if err != nil {
		return nil, err
	}
	m, err := readHandshake(c)
	if err != nil {
		return nil, handshakeErr(err, s.handshakeTimeout, "hello")
	}
	var peer *Hello
	switch m := m.(type) {
	case *Reject:
		return nil, &HandshakeError{Remote: true, Code: m.Code, Reason: m.Reason}
	case *Hello:
		peer = m
	default:
		return nil, unexpected(m.Type(), phaseHandshake)
	}
	if err := s.readVerdict(c); err != nil {
		return nil, err
	}
	version, codec, rej := s.evaluate(lo, hi, peer)
	if rej == nil {
		rej = s.verifyPeer(c, peer, true)
	}
	if rej != nil {
		_ = writeFrames(c, false, rej)
		return nil, &HandshakeError{Code: rej.Code, Reason: rej.Reason}
	}
	if err := writeFrames(c, false, &Accept{}); err != nil {
		return nil, handshakeErr(err, s.handshakeTimeout, "reading of our verdict")
	}
	return &handshakeResult{conn: c, peer: peer, version: version, codec: codec}, nil
}

// peekConn is a connection whose first bytes were peeked: reads drain the
// buffer, then go straight to the connection.
type peekConn struct {
	net.Conn
	br *bufio.Reader
}

func (c *peekConn) Read(p []byte) (int, error) {
	if c.br.Buffered() > 0 {
		return c.br.Read(p)
	}
	return c.Conn.Read(p)
}

// serverHandshake runs the accepting side's handshake on conn.
func serverHandshake(ctx context.Context, conn net.Conn, s *settings) (res *handshakeResult, err error) {
	done := watchDeadline(ctx, conn, s.handshakeTimeout)
	defer func() {
		if cerr := done(); cerr != nil {
			err = cerr
		}
	}()
	pc := &peekConn{Conn: conn, br: bufio.NewReaderSize(conn, 512)}
	first, err := pc.br.Peek(preambleSize)
	if err != nil {
		return nil, handshakeErr(err, s.handshakeTimeout, "first bytes")
	}
	isTLS := first[0] == tlsRecordHandshake
	isUs := bytes.Equal(first[:4], Magic[:])
	var c net.Conn = pc
	switch {
	case s.cfg.TLS != nil && isTLS:
		tc := tls.Server(pc, s.serverTLS())
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, handshakeErr(tlsErr(err), s.handshakeTimeout, "TLS handshake")
		}
		c = tc
	case s.cfg.TLS != nil && isUs:
		// A plaintext client: read its hello so that it is not left
		// blocked writing, then tell it why it is refused.
		_, _ = io.ReadFull(pc, make([]byte, preambleSize))
		_, _ = readHandshake(pc)
		rej := &Reject{Code: RejectTLSRequired,
			Reason: "this agent requires TLS; the peer connected in plaintext (insecure mode)"}
		_ = writeFrames(pc, true, rej)
		return nil, &HandshakeError{Code: rej.Code, Reason: rej.Reason}
	case s.cfg.Insecure && isTLS:
		// A TLS client: read its ClientHello record, then answer in
		// plaintext, which its TLS stack reports as a record that is not
		// TLS; the magic lets it say why.
		n := int(binary.BigEndian.Uint16(first[3:5]))
		_, _ = io.ReadFull(pc, make([]byte, 5+n))
		rej := &Reject{Code: RejectPlaintext,
			Reason: "this agent runs insecure (plaintext); the peer started a TLS handshake"}
		_ = writeFrames(pc, true, rej)
		return nil, &HandshakeError{Code: rej.Code, Reason: rej.Reason}
	case !isUs:
		return nil, fmt.Errorf("%w: first bytes % x", ErrBadMagic, first)
	}

	lo, hi, err := s.readPreamble(c)
	if err != nil {
		return nil, err
	}
	m, err := readHandshake(c)
	if err != nil {
		if errors.Is(err, ErrMalformed) || errors.Is(err, ErrLimit) {
			_ = writeFrames(c, true, &Reject{Code: RejectMalformed, Reason: err.Error()})
		}
		return nil, handshakeErr(err, s.handshakeTimeout, "hello")
	}
	peer, ok := m.(*Hello)
	if !ok {
		return nil, unexpected(m.Type(), phaseHandshake)
	}
	version, codec, rej := s.evaluate(lo, hi, peer)
	if rej == nil {
		rej = s.verifyPeer(c, peer, false)
	}
	if rej != nil {
		_ = writeFrames(c, true, s.hello(), rej)
		return nil, &HandshakeError{Code: rej.Code, Reason: rej.Reason}
	}
	if err := writeFrames(c, true, s.hello(), &Accept{}); err != nil {
		return nil, handshakeErr(err, s.handshakeTimeout, "reading of our hello")
	}
	if err := s.readVerdict(c); err != nil {
		return nil, err
	}
	return &handshakeResult{conn: c, peer: peer, version: version, codec: codec}, nil
}
