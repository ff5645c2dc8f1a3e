package freeze

import (
	"errors"
	"strconv"
)

// Sentinel errors. Callers test for them with errors.Is.
var (
	// ErrSelf means the caller asked to freeze its own process.
	ErrSelf = errors.New("freeze: refusing to freeze the calling process")
	// ErrExited means the process exited (or is a zombie) before it could
	// be frozen.
	ErrExited = errors.New("freeze: process has exited")
	// ErrTimeout means the process (or its cgroup) did not reach the
	// wanted state within Timeout; Freeze has undone what it began.
	ErrTimeout = errors.New("freeze: timed out")
	// ErrReleased means Kill was called after Thaw: the process runs again
	// and is no longer this Frozen's to kill.
	ErrReleased = errors.New("freeze: process already thawed")
	// ErrPIDReused means a Record's pid now belongs to another process (its
	// start time differs), so ThawRecord or KillRecord did not signal it.
	ErrPIDReused = errors.New("freeze: pid belongs to another process now")
	// ErrBadRecord means a Record does not describe a freeze (unknown
	// method, relative or missing cgroup path).
	ErrBadRecord = errors.New("freeze: invalid record")
)

// Error is a failed operation on a process: Op names it (such as
// "write cgroup.freeze" or "pidfd_send_signal SIGSTOP"), PID is the process
// and Err the kernel's errno or a sentinel error.
type Error struct {
	Op  string
	PID int
	Err error
}

// Error returns "freeze: OP pid PID: ERR".
func (e *Error) Error() string {
	return "freeze: " + e.Op + " pid " + strconv.Itoa(e.PID) + ": " + e.Err.Error()
}

// Unwrap returns the underlying error.
func (e *Error) Unwrap() error { return e.Err }

func opErr(op string, pid int, err error) error {
	return &Error{Op: op, PID: pid, Err: err}
}
