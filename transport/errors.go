package transport

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Sentinel errors. Callers test for them with errors.Is; the errors this
// package returns are *OpError values that wrap one of these, a *LimitError,
// a *HandshakeError, or an error of the network or TLS stack.
var (
	// ErrClosed means the link was closed by this side.
	ErrClosed = errors.New("transport: link closed")
	// ErrPeerLost means the link ended without this side closing it: the
	// peer closed or reset the connection, or stopped answering keepalive
	// pings. The error text carries what was seen.
	ErrPeerLost = errors.New("transport: link to the peer lost")
	// ErrNoTLS means a Config has no TLS configuration and does not ask for
	// Insecure: plaintext is never a default.
	ErrNoTLS = errors.New("transport: no TLS configuration (plaintext needs Insecure)")
	// ErrConfig means a Config is unusable; the text says why.
	ErrConfig = errors.New("transport: invalid configuration")
	// ErrBadMagic means the peer's first bytes are neither a TLS handshake
	// nor a tcpmigrate preamble: it is not a tcpmigrate agent.
	ErrBadMagic = errors.New("transport: peer is not a tcpmigrate agent (bad magic)")
	// ErrHandshake is matched by every *HandshakeError: one side refused the
	// handshake, before anything was frozen.
	ErrHandshake = errors.New("transport: handshake refused")
	// ErrVersion means the two sides have no protocol version in common.
	ErrVersion = errors.New("transport: no common protocol version")
	// ErrMissingFeature means a side lacks a kernel feature the other requires.
	ErrMissingFeature = errors.New("transport: peer lacks a required kernel feature")
	// ErrPlaintextPeer means the peer spoke plaintext to this side, which
	// requires TLS.
	ErrPlaintextPeer = errors.New("transport: peer speaks plaintext but this side requires TLS")
	// ErrTLSPeer means the peer requires TLS (or spoke it) and this side is
	// configured Insecure.
	ErrTLSPeer = errors.New("transport: peer requires TLS but this side is insecure (plaintext)")
	// ErrTLS means the TLS handshake failed.
	ErrTLS = errors.New("transport: TLS handshake failed")
	// ErrAuth means the TLS handshake failed on a certificate: the peer's
	// was not signed by a trusted CA, or the peer refused ours. Errors
	// matching ErrAuth also match ErrTLS.
	ErrAuth = errors.New("transport: TLS authentication failed")
	// ErrTimeout means the handshake did not finish within its deadline.
	ErrTimeout = errors.New("transport: handshake timed out")
	// ErrMalformed means the peer sent bytes that do not parse: a bad frame,
	// field or value. The error text names the field.
	ErrMalformed = errors.New("transport: malformed input")
	// ErrUnexpected means a well-formed message arrived where the protocol
	// does not allow it (such as a snapshot record on the control stream).
	ErrUnexpected = errors.New("transport: unexpected message")
	// ErrTruncated means a stream ended before its end marker or in the
	// middle of a frame.
	ErrTruncated = errors.New("transport: stream ended early")
	// ErrLimit is matched by every *LimitError.
	ErrLimit = errors.New("transport: limit exceeded")
	// ErrDuplicate means a connection index arrived twice on one link.
	ErrDuplicate = errors.New("transport: duplicate connection index")
	// ErrBroken means an earlier error (such as a canceled read in the middle
	// of a frame) left a stream out of step; it can no longer be used.
	ErrBroken = errors.New("transport: stream broken by an earlier error")
)

// OpError is a failed operation of this package. Op names it (such as
// "dial", "accept", "control recv" or "snapshot read"); Err says why.
type OpError struct {
	// Op names the operation, with the peer's address when there is one.
	Op string
	// Err is the cause.
	Err error
}

// Error returns "transport: <op>: <reason>".
func (e *OpError) Error() string {
	return "transport: " + e.Op + ": " + strings.TrimPrefix(e.Err.Error(), "transport: ")
}

// Unwrap returns the underlying error.
func (e *OpError) Unwrap() error { return e.Err }

// Timeout reports whether the operation failed on a deadline.
func (e *OpError) Timeout() bool {
	var ne net.Error
	return errors.Is(e.Err, ErrTimeout) || (errors.As(e.Err, &ne) && ne.Timeout())
}

// Temporary reports false: no error of this package goes away by retrying
// the same call. It exists to satisfy net.Error.
func (e *OpError) Temporary() bool { return false }

var _ net.Error = (*OpError)(nil)

// opError wraps err as an *OpError for op, unless it already is one.
func opError(op string, err error) error {
	if err == nil {
		return nil
	}
	var oe *OpError
	if errors.As(err, &oe) && oe.Op == op {
		return err
	}
	return &OpError{Op: op, Err: err}
}

// LimitError says that a received value exceeded a receive limit. Limit names
// the limit, as in Limits ("frame size", "snapshot size", "migration bytes",
// "connections", "connection index", "decoder window"); Value is what was
// asked for (0 when the decoder could not tell) and Max the limit.
type LimitError struct {
	// Limit names the limit.
	Limit string
	// Value is the value that exceeded it, or 0 when unknown.
	Value uint64
	// Max is the limit.
	Max uint64
}

// Error returns a sentence naming the limit, the value and the maximum.
func (e *LimitError) Error() string {
	if e.Value == 0 {
		return "transport: limit exceeded: " + e.Limit + " over the limit of " + strconv.FormatUint(e.Max, 10)
	}
	return "transport: limit exceeded: " + e.Limit + " " + strconv.FormatUint(e.Value, 10) +
		" over the limit of " + strconv.FormatUint(e.Max, 10)
}

// Is makes errors.Is(err, ErrLimit) true.
func (e *LimitError) Is(target error) bool { return target == ErrLimit }

// HandshakeError says that one side refused the handshake. Remote is true
// when the peer refused (its Reject message arrived), false when this side
// did. Code and Reason are those of the Reject message.
type HandshakeError struct {
	// Remote is true when the peer refused, false when this side did.
	Remote bool
	// Code is the Reject message's code.
	Code RejectCode
	// Reason is the Reject message's reason.
	Reason string
}

// Error returns a sentence naming who refused, the code and the reason.
func (e *HandshakeError) Error() string {
	who := "this side refused the peer"
	if e.Remote {
		who = "the peer refused this side"
	}
	return "transport: handshake: " + who + ": " + e.Code.String() + ": " + e.Reason
}

// Is makes errors.Is match ErrHandshake, and the sentinel of the code:
// ErrVersion, ErrMissingFeature, ErrPlaintextPeer, ErrTLSPeer or
// ErrMalformed.
func (e *HandshakeError) Is(target error) bool {
	if target == ErrHandshake {
		return true
	}
	switch e.Code {
	case RejectVersion:
		return target == ErrVersion
	case RejectFeature:
		return target == ErrMissingFeature
	case RejectMalformed:
		return target == ErrMalformed
	case RejectTLSRequired:
		// The side that required TLS saw a plaintext peer; the side that
		// was refused for it is the insecure one.
		if e.Remote {
			return target == ErrTLSPeer
		}
		return target == ErrPlaintextPeer
	case RejectPlaintext:
		if e.Remote {
			return target == ErrPlaintextPeer
		}
		return target == ErrTLSPeer
	}
	return false
}

// tlsError is a TLS handshake failure; it matches ErrTLS, and ErrAuth when a
// certificate was the cause.
type tlsError struct {
	auth bool
	err  error
}

func (e *tlsError) Error() string {
	if e.auth {
		return "TLS authentication failed: " + e.err.Error()
	}
	return "TLS handshake failed: " + e.err.Error()
}

func (e *tlsError) Unwrap() error { return e.err }

func (e *tlsError) Is(target error) bool {
	return target == ErrTLS || (e.auth && target == ErrAuth)
}

// malformedf returns an error matching ErrMalformed.
func malformedf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
}
