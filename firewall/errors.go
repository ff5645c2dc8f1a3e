package firewall

import (
	"errors"
	"strconv"
	"strings"
)

// Sentinel errors. Every error this package returns is an *Error wrapping
// one of these or the kernel's errno; callers test for them with errors.Is.
var (
	// ErrInvalidConfig means a Config field is out of range; nothing was
	// created.
	ErrInvalidConfig = errors.New("firewall: invalid configuration")
	// ErrInvalidTuple means a Tuple cannot name a TCP connection (an invalid
	// or unspecified address, port 0, or one IPv4 and one IPv6 endpoint). The
	// whole call is refused and the kernel is not touched.
	ErrInvalidTuple = errors.New("firewall: invalid tuple")
	// ErrExists means the instance is taken: a live process holds it, or a
	// table of that name is left over from a dead one (run Sweep first).
	ErrExists = errors.New("firewall: instance already exists")
	// ErrClosed means the Lock was closed.
	ErrClosed = errors.New("firewall: lock is closed")
	// ErrReleased means the Lock was released (Lock.Release): it holds
	// nothing and can lock nothing any more; only Close is left.
	ErrReleased = errors.New("firewall: lock is released")
	// ErrNotLocked means Renew was asked to renew a tuple this Lock does not
	// hold. Nothing was renewed.
	ErrNotLocked = errors.New("firewall: tuple is not locked")
	// ErrLeaseLapsed means the lease of the tuples named in the *Error ran
	// out (or came within a few hundred milliseconds of it) before it was
	// renewed: for a moment their packets may have passed. They are locked
	// again with a fresh lease; the caller should treat those connections as
	// disturbed (on the source: roll them back).
	ErrLeaseLapsed = errors.New("firewall: lease lapsed before renewal")
	// ErrRenewerRunning means StartRenewer was called while a renewer runs.
	ErrRenewerRunning = errors.New("firewall: renewer already running")
	// ErrNoHold means Lock.Hold was called on a lock without the
	// zero-window hold: Config.Hold was not set, or the kernel refused the
	// rule that rewrites the window (see Lock.CanHold).
	ErrNoHold = errors.New("firewall: zero-window hold not available")
	// ErrNotSupported is returned on systems other than Linux.
	ErrNotSupported = errors.New("firewall: not supported on this system")
)

// Error is the error type of the package: the operation that failed, the
// table it worked on and, when only some tuples are at fault, which ones.
type Error struct {
	// Op is the operation: "new", "hold", "lock", "unlock", "renew",
	// "close" or "sweep".
	Op string
	// Table is the nftables table the operation worked on, if any.
	Table string
	// Tuples lists the tuples at fault, when the error concerns some of the
	// tuples passed rather than the whole call (invalid, not locked, lapsed).
	Tuples []Tuple
	// Err is a sentinel error of this package or the kernel's error.
	Err error
}

// Error returns "firewall: OP TABLE: ..." followed by up to three of the
// tuples at fault and the cause.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("firewall: ")
	b.WriteString(e.Op)
	if e.Table != "" {
		b.WriteString(" ")
		b.WriteString(e.Table)
	}
	b.WriteString(": ")
	const show = 3
	for i, t := range e.Tuples {
		if i == show {
			b.WriteString("(and ")
			b.WriteString(strconv.Itoa(len(e.Tuples) - show))
			b.WriteString(" more): ")
			break
		}
		b.WriteString(t.String())
		b.WriteString(": ")
	}
	if e.Err != nil {
		b.WriteString(strings.TrimPrefix(e.Err.Error(), "firewall: "))
	} else {
		b.WriteString("unknown error")
	}
	return b.String()
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }
