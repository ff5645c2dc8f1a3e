package freeze

import (
	"errors"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// stat is what this package reads from /proc/PID/stat.
type stat struct {
	state     byte   // R, S, D, T, t, Z, X...
	startTime uint64 // field 22: clock ticks after boot
}

// readStat parses /proc/PID/stat or /proc/PID/task/TID/stat. The command
// name may hold spaces and parentheses, so fields are counted from the last
// ')'.
func readStat(path string) (stat, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return stat{}, unwrapPath(err)
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return stat{}, unix.EBADMSG
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 || len(f[0]) != 1 {
		return stat{}, unix.EBADMSG
	}
	st, err := strconv.ParseUint(f[19], 10, 64) // field 22, the third after ')' being field 3
	if err != nil {
		return stat{}, unix.EBADMSG
	}
	return stat{state: f[0][0], startTime: st}, nil
}

func procStat(pid int) (stat, error) {
	return readStat("/proc/" + strconv.Itoa(pid) + "/stat")
}

func stopped(state byte) bool { return state == 'T' || state == 't' }
func dead(state byte) bool    { return state == 'Z' || state == 'X' }

// allStopped says whether every thread of process pid is stopped. It
// fails with ErrExited when the process is gone or a zombie.
func allStopped(pid int) (bool, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return false, ErrExited
	}
	if err != nil {
		return false, unwrapPath(err)
	}
	all := len(ents) > 0
	for _, e := range ents {
		st, err := readStat(dir + "/" + e.Name() + "/stat")
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			continue // a thread that exited meanwhile
		}
		if err != nil {
			return false, err
		}
		if e.Name() == strconv.Itoa(pid) && dead(st.state) {
			return false, ErrExited
		}
		if !stopped(st.state) && !dead(st.state) {
			all = false
		}
	}
	return all, nil
}

// waitStopped polls until every thread of pid is stopped, or the deadline.
func waitStopped(pid int, deadline time.Time) error {
	delay := 100 * time.Microsecond
	for {
		ok, err := allStopped(pid)
		if err != nil || ok {
			return err
		}
		if time.Now().After(deadline) {
			return ErrTimeout
		}
		time.Sleep(delay)
		delay = min(2*delay, 20*time.Millisecond)
	}
}

// signal sends sig through pidfd; a process that has exited (ESRCH) is not
// an error for the callers, which want it stopped, resumed or dead.
func signal(pidfd int, sig unix.Signal) error {
	err := unix.PidfdSendSignal(pidfd, sig, nil, 0)
	if err == unix.ESRCH {
		return nil
	}
	return err
}

// waitExit waits until the process of pidfd has exited (the pidfd becomes
// readable), or the deadline.
func waitExit(pidfd int, deadline time.Time) error {
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return ErrTimeout
		}
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, int(left/time.Millisecond)+1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n > 0 {
			return nil
		}
	}
}

// unwrapPath drops the *fs.PathError around an errno: the path is in Op.
func unwrapPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
