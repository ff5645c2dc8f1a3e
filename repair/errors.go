package repair

import (
	"errors"
	"net/netip"
	"strconv"
)

// Sentinel errors. Callers test for them with errors.Is.
var (
	// ErrUnsupported is matched by every *UnsupportedError: the connection
	// cannot be migrated, and nothing was changed on it.
	ErrUnsupported = errors.New("repair: connection cannot be migrated")
	// ErrQueueMismatch means the bytes peeked from a queue did not match the
	// length the kernel reported for it (CRIU issue #622): the dump is refused.
	ErrQueueMismatch = errors.New("repair: queue length does not match its contents")
	// ErrUnstable means the connection's counters kept changing during the
	// dump: packets are reaching the socket, so the lock is not in place.
	ErrUnstable = errors.New("repair: connection changed during the dump (is it locked?)")
	// ErrBusy means Precapture refused a connection with bytes in flight
	// or never sent: it is captured under the lock instead.
	ErrBusy = errors.New("repair: bytes in flight or never sent: no pre-copy")
	// ErrInvalidSnapshot means a Snapshot failed validation; the error text
	// names the field.
	ErrInvalidSnapshot = errors.New("repair: invalid snapshot")
	// ErrRestoreMismatch means a restored socket did not read back the state
	// it was given (queue lengths, sequence numbers or state).
	ErrRestoreMismatch = errors.New("repair: restored socket does not match the snapshot")
	// ErrNoRepairWindow means the kernel lacks TCP_REPAIR_WINDOW (before 4.8);
	// migrating without it makes the peer drop data (CRIU issue #168).
	ErrNoRepairWindow = errors.New("repair: kernel has no TCP_REPAIR_WINDOW (needs Linux 4.8+)")
	// ErrNoInjector means a connection's state needs segments crafted as if
	// from the peer and the Restorer has no Injector to send them.
	ErrNoInjector = errors.New("repair: restoring this state needs an Injector for crafted segments")
	// ErrResumedLive is matched by an error of a resume (Resume,
	// ResumeHeld, Restorer.Resume) that failed after the socket left
	// repair mode: the connection is live and the caller owns it. What
	// failed is a finishing touch: the crafted segment sent after it (the
	// probe of a half-closed connection, the kick of a held one; the
	// connection then recovers at the peer's persist probe or its own
	// timers), or an option that leaving repair clears could not be put
	// back. Such a socket must be delivered, or closed, never discarded:
	// Discard on a live socket would tear the connection down. Any other
	// error of a resume leaves the socket in repair mode.
	ErrResumedLive = errors.New("repair: socket resumed (live), but a step after leaving repair mode failed")
)

// Reason is a stable code saying why a connection cannot be migrated.
type Reason uint8

// The reasons a connection is refused.
const (
	ReasonState    Reason = iota + 1 // its TCP state is not one this version migrates
	ReasonULP                        // an upper-layer protocol such as kTLS is attached
	ReasonMD5                        // TCP-MD5 signatures are in use
	ReasonAO                         // TCP-AO authentication is in use
	ReasonMPTCP                      // it is an MPTCP socket
	ReasonUrgent                     // urgent data is pending
	ReasonRepairOn                   // the socket is already in repair mode (someone else is migrating it)
	ReasonNotTCP                     // the descriptor is not a TCP socket
	ReasonFamily                     // the address family is not IPv4 or IPv6
)

var reasonNames = [...]string{
	ReasonState:    "state",
	ReasonULP:      "ulp",
	ReasonMD5:      "tcp-md5",
	ReasonAO:       "tcp-ao",
	ReasonMPTCP:    "mptcp",
	ReasonUrgent:   "urgent-data",
	ReasonRepairOn: "repair-on",
	ReasonNotTCP:   "not-tcp",
	ReasonFamily:   "family",
}

// String returns the reason's stable short name, as used in reports.
func (r Reason) String() string {
	if int(r) < len(reasonNames) && reasonNames[r] != "" {
		return reasonNames[r]
	}
	return "reason(" + itoa(int(r)) + ")"
}

// UnsupportedError says that a connection cannot be migrated and why. It is
// returned before anything on the socket was changed.
type UnsupportedError struct {
	Local, Remote netip.AddrPort
	Reason        Reason
	Detail        string // such as the state name or the ULP name
}

func (e *UnsupportedError) Error() string {
	s := "repair: cannot migrate " + connString(e.Local, e.Remote) + ": " + e.Reason.String()
	if e.Detail != "" {
		s += " (" + e.Detail + ")"
	}
	return s
}

// Is makes errors.Is(err, ErrUnsupported) true.
func (e *UnsupportedError) Is(target error) bool { return target == ErrUnsupported }

// OpError is a failed step of a dump or restore. Op names the step (such as
// "peek send queue" or "setsockopt TCP_REPAIR_WINDOW"); Err is the kernel's
// errno or a sentinel error of this package.
type OpError struct {
	Op            string
	Local, Remote netip.AddrPort
	Err           error
}

func (e *OpError) Error() string {
	s := "repair: " + e.Op
	if e.Local.IsValid() || e.Remote.IsValid() {
		s += " " + connString(e.Local, e.Remote)
	}
	return s + ": " + e.Err.Error()
}

// Unwrap returns the underlying error.
func (e *OpError) Unwrap() error { return e.Err }

// opErr is the *OpError of the step op of the connection of s.
func (s *Snapshot) opErr(op string, err error) error {
	return &OpError{Op: op, Local: s.Local, Remote: s.Remote, Err: err}
}

func connString(l, r netip.AddrPort) string {
	return l.String() + "->" + r.String()
}

func itoa(i int) string { return strconv.Itoa(i) }
