package fdpass

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Callers test for them with errors.Is; the error text of
// the wrapping error says what exactly was wrong.
var (
	// ErrMalformed means a frame broke the protocol: bad magic, unknown
	// message type, a length that does not add up, a message out of order.
	ErrMalformed = errors.New("fdpass: malformed frame")
	// ErrVersion means the peer speaks a protocol version this side does not.
	ErrVersion = errors.New("fdpass: unsupported protocol version")
	// ErrTooLarge means a frame, a state blob or a batch exceeds a size limit.
	ErrTooLarge = errors.New("fdpass: size limit exceeded")
	// ErrFDCount means the descriptors that arrived do not match the frame
	// that names them (too few, too many, or lost to a full descriptor table).
	ErrFDCount = errors.New("fdpass: descriptors do not match the frame")
	// ErrNotTCP means a descriptor that arrived is not a TCP socket.
	ErrNotTCP = errors.New("fdpass: descriptor is not a TCP socket")
	// ErrUnexpected means a well-formed message arrived where another kind
	// was expected (for example an acknowledgement instead of sockets).
	ErrUnexpected = errors.New("fdpass: unexpected message")
	// ErrRefused means the listener's policy does not allow the connecting
	// process. It is matched by *PeerError and by a *RemoteError with
	// CodeRefused.
	ErrRefused = errors.New("fdpass: peer not allowed")
	// ErrRejected means the peer's application declined the message (it sent
	// an error frame with CodeRejected).
	ErrRejected = errors.New("fdpass: peer rejected the message")
	// ErrInvalid means the caller passed an argument the protocol cannot
	// carry: a nil file, a duplicate ID, a bad policy.
	ErrInvalid = errors.New("fdpass: invalid argument")
)

// OpError is a failed operation. Op names it and the socket file (such as
// "listen /run/tcpmigrate/handoff.sock" or "receive on
// /run/tcpmigrate/handoff.sock"); Err
// is a sentinel error of this package (possibly wrapped with details), a
// *PeerError, a *RemoteError, or the kernel's errno.
type OpError struct {
	Op  string
	Err error
}

func (e *OpError) Error() string {
	// The wrapped error usually carries the package prefix already.
	return "fdpass: " + e.Op + ": " + strings.TrimPrefix(e.Err.Error(), "fdpass: ")
}

// Unwrap returns the underlying error.
func (e *OpError) Unwrap() error { return e.Err }

// Cred is the identity of the process at the other end of a unix socket, as
// the kernel recorded it when the socket was connected (SO_PEERCRED).
type Cred struct {
	PID int32
	UID uint32
	GID uint32
}

func (c Cred) String() string {
	return fmt.Sprintf("pid %d uid %d gid %d", c.PID, c.UID, c.GID)
}

// PeerError says that a listener's policy refused a connecting process.
// errors.Is(err, ErrRefused) is true for it.
type PeerError struct {
	Cred Cred
}

func (e *PeerError) Error() string {
	return "fdpass: peer " + e.Cred.String() + " is not allowed by the listener's policy"
}

// Is makes errors.Is(err, ErrRefused) true.
func (e *PeerError) Is(target error) bool { return target == ErrRefused }

// ErrorCode says what an error frame reports. The values are wire
// constants.
type ErrorCode uint16

// The error codes of error frames.
const (
	CodeRefused    ErrorCode = iota + 1 // the peer's credentials are not allowed
	CodeMalformed                       // a frame broke the protocol
	CodeVersion                         // the protocol version is not spoken
	CodeTooLarge                        // a size limit was exceeded
	CodeFDCount                         // descriptors did not match the frame
	CodeNotTCP                          // a descriptor was not a TCP socket
	CodeUnexpected                      // a message arrived out of order
	CodeRejected                        // the application declined the message
)

var codeInfo = [...]struct {
	name string
	err  error
}{
	CodeRefused:    {"refused", ErrRefused},
	CodeMalformed:  {"malformed", ErrMalformed},
	CodeVersion:    {"version", ErrVersion},
	CodeTooLarge:   {"too-large", ErrTooLarge},
	CodeFDCount:    {"fd-count", ErrFDCount},
	CodeNotTCP:     {"not-tcp", ErrNotTCP},
	CodeUnexpected: {"unexpected", ErrUnexpected},
	CodeRejected:   {"rejected", ErrRejected},
}

// String returns the code's stable short name.
func (c ErrorCode) String() string {
	if int(c) < len(codeInfo) && codeInfo[c].name != "" {
		return codeInfo[c].name
	}
	return fmt.Sprintf("code(%d)", uint16(c))
}

// sentinel returns the sentinel error a code stands for, or nil.
func (c ErrorCode) sentinel() error {
	if int(c) < len(codeInfo) {
		return codeInfo[c].err
	}
	return nil
}

// codeOf returns the code that reports err to the peer.
func codeOf(err error) ErrorCode {
	for c := CodeRefused; int(c) < len(codeInfo); c++ {
		if errors.Is(err, codeInfo[c].err) {
			return c
		}
	}
	return CodeRejected
}

// RemoteError is an error frame the peer sent: it stopped because of what it
// says. errors.Is matches it against the sentinel error of its code, so
// errors.Is(err, ErrRefused) is true when the listener refused this process.
type RemoteError struct {
	Code    ErrorCode
	Message string
}

func (e *RemoteError) Error() string {
	return "fdpass: peer reported " + e.Code.String() + ": " + e.Message
}

// Is matches the sentinel error of the code.
func (e *RemoteError) Is(target error) bool {
	s := e.Code.sentinel()
	return s != nil && target == s
}
