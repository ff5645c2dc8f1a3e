package procsock

import (
	"errors"
	"strconv"
)

// Sentinel errors. Callers test for them with errors.Is.
var (
	// ErrNotSocket means a descriptor given to DupSockets does not refer to a
	// socket any more.
	ErrNotSocket = errors.New("procsock: descriptor is not a socket")
	// ErrChanged means a descriptor refers to another socket than the one
	// List reported: the process closed and reused it before it was frozen.
	ErrChanged = errors.New("procsock: descriptor refers to another socket than the one listed")
	// ErrNoDescriptor means a Socket has no descriptor in the process (it
	// stays behind), so it cannot be duplicated.
	ErrNoDescriptor = errors.New("procsock: socket has no descriptor in the process")
)

// Error is a failed operation on a process: Op names it (such as
// "pidfd_getfd" or "sock_diag dump"), PID is the process, FD the descriptor
// in that process or -1, and Err the kernel's errno or a sentinel error.
type Error struct {
	Op  string
	PID int
	FD  int
	Err error
}

// Error returns "procsock: OP pid PID fd FD: ERR", without the fd part when
// there is no descriptor.
func (e *Error) Error() string {
	s := "procsock: " + e.Op + " pid " + strconv.Itoa(e.PID)
	if e.FD >= 0 {
		s += " fd " + strconv.Itoa(e.FD)
	}
	return s + ": " + e.Err.Error()
}

// Unwrap returns the underlying error.
func (e *Error) Unwrap() error { return e.Err }

func opErr(op string, pid, fd int, err error) error {
	return &Error{Op: op, PID: pid, FD: fd, Err: err}
}
