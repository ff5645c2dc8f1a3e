package freeze

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Timeout bounds every wait of this package: for a process or cgroup to
// reach the frozen state, to thaw, or to exit after SIGKILL. A thread in an
// uninterruptible sleep (a hung NFS server) can hold a SIGSTOP off longer;
// Freeze then gives up and undoes what it began.
const Timeout = 5 * time.Second

// Method says how a process is held still.
type Method uint8

// The methods. The zero Method is invalid.
const (
	// MethodSignal: SIGSTOP to stop, SIGCONT to resume.
	MethodSignal Method = iota + 1
	// MethodCgroup: the cgroup v2 freezer, cgroup.freeze of the process's
	// own cgroup.
	MethodCgroup
)

var methodNames = [...]string{MethodSignal: "sigstop", MethodCgroup: "cgroup"}

// String returns the method's stable name: "sigstop" or "cgroup".
func (m Method) String() string {
	if int(m) < len(methodNames) && methodNames[m] != "" {
		return methodNames[m]
	}
	return "method(" + strconv.Itoa(int(m)) + ")"
}

// MarshalText encodes the method by its name, for journals.
func (m Method) MarshalText() ([]byte, error) {
	if int(m) >= len(methodNames) || methodNames[m] == "" {
		return nil, ErrBadRecord
	}
	return []byte(methodNames[m]), nil
}

// UnmarshalText decodes a name written by MarshalText.
func (m *Method) UnmarshalText(b []byte) error {
	for i, n := range methodNames {
		if n != "" && n == string(b) {
			*m = Method(i)
			return nil
		}
	}
	return ErrBadRecord
}

// Record is the plain-data account of a freeze that a journal keeps, so
// that a later process ("tcpmigrate recover") can undo it with ThawRecord
// if the one that froze the process died first.
type Record struct {
	// PID is the frozen process.
	PID int `json:"pid"`
	// StartTime is the process's start time in clock ticks after boot
	// (field 22 of /proc/PID/stat); with PID it names the process even
	// after the pid is reused.
	StartTime uint64 `json:"start_time"`
	// Method is how the process was frozen.
	Method Method `json:"method"`
	// Cgroup is the directory of the frozen cgroup (such as
	// /sys/fs/cgroup/app.slice/app.service) when Method is MethodCgroup.
	Cgroup string `json:"cgroup,omitempty"`
	// Inherited is true when the process was already stopped, or its
	// cgroup already frozen, before Freeze: nothing is to be undone.
	Inherited bool `json:"inherited,omitempty"`
}

// Frozen is a process held still by Freeze. Its methods are safe for
// concurrent use.
type Frozen struct {
	rec Record

	mu    sync.Mutex // guards pidfd and state
	pidfd int        // -1 once released
	state state
}

type state uint8

const (
	stateFrozen state = iota
	stateThawed
	stateKilled
)

// Freeze holds process pid still, with the cgroup v2 freezer when the
// process has a cgroup of its own and with SIGSTOP otherwise (see the
// package documentation for the rule), and returns once every thread of
// the process is frozen or stopped, within Timeout. On error the process
// is left as it was found.
//
// Freeze refuses the calling process (ErrSelf) and fails with ErrExited for
// a process that is gone or a zombie. The caller needs the right to signal
// the process or to write its cgroup.freeze.
func Freeze(pid int) (*Frozen, error) {
	if pid <= 0 {
		return nil, opErr("freeze", pid, unix.EINVAL)
	}
	if pid == os.Getpid() {
		return nil, opErr("freeze", pid, ErrSelf)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, opErr("pidfd_open", pid, err)
	}
	f, err := freeze(pid, pidfd)
	if err != nil {
		unix.Close(pidfd)
		return nil, err
	}
	return f, nil
}

func freeze(pid, pidfd int) (*Frozen, error) {
	// The pidfd was opened first: if the stat read below is of the same
	// process, the pidfd names it too.
	st, err := procStat(pid)
	if err != nil {
		return nil, opErr("read /proc/PID/stat", pid, err)
	}
	if dead(st.state) {
		return nil, opErr("freeze", pid, ErrExited)
	}
	dir, err := cgroupDir(pid)
	if err != nil {
		return nil, err
	}
	f := &Frozen{rec: Record{PID: pid, StartTime: st.startTime}, pidfd: pidfd}
	deadline := time.Now().Add(Timeout)
	if dir != "" {
		f.rec.Method, f.rec.Cgroup = MethodCgroup, dir
		already, err := readFreeze(dir)
		if err != nil {
			return nil, opErr("read "+dir+"/cgroup.freeze", pid, err)
		}
		f.rec.Inherited = already
		if !already {
			if err := writeFreeze(dir, true); err != nil {
				return nil, opErr("write 1 to "+dir+"/cgroup.freeze", pid, err)
			}
		}
		if err := waitFrozen(dir, true, deadline); err != nil {
			if !already {
				err = errors.Join(err, writeFreeze(dir, false))
			}
			return nil, opErr("wait for frozen 1 in "+dir+"/cgroup.events", pid, err)
		}
		return f, nil
	}

	f.rec.Method = MethodSignal
	already, err := allStopped(pid)
	if err != nil {
		return nil, opErr("read /proc/PID/task", pid, err)
	}
	f.rec.Inherited = already
	if !already {
		if err := signal(pidfd, unix.SIGSTOP); err != nil {
			return nil, opErr("pidfd_send_signal SIGSTOP", pid, err)
		}
	}
	if err := waitStopped(pid, deadline); err != nil {
		if !already {
			err = errors.Join(err, signal(pidfd, unix.SIGCONT))
		}
		return nil, opErr("wait for every thread to stop", pid, err)
	}
	return f, nil
}

// PID returns the frozen process's pid.
func (f *Frozen) PID() int { return f.rec.PID }

// Method returns how the process was frozen.
func (f *Frozen) Method() Method { return f.rec.Method }

// Cgroup returns the directory of the frozen cgroup, or "" for
// MethodSignal.
func (f *Frozen) Cgroup() string { return f.rec.Cgroup }

// Inherited says whether the process was already stopped (or its cgroup
// frozen) before Freeze, in which case Thaw leaves it so.
func (f *Frozen) Inherited() bool { return f.rec.Inherited }

// Record returns the freeze as plain data for a journal; see ThawRecord.
func (f *Frozen) Record() Record { return f.rec }

// Thaw lets the process run again: cgroup.freeze=0 (and a wait, within
// Timeout, for cgroup.events to say "frozen 0"), or SIGCONT. A process that
// was frozen before Freeze stays frozen, and a process that has exited
// meanwhile is not an error. Thaw is idempotent and does nothing after
// Kill. If it fails, the process may still be frozen and Thaw may be
// called again.
func (f *Frozen) Thaw() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.state != stateFrozen {
		return nil
	}
	if !f.rec.Inherited {
		if err := thaw(f.rec, f.pidfd); err != nil {
			return err
		}
	}
	f.release(stateThawed)
	return nil
}

// Kill ends the process with SIGKILL, then thaws its cgroup (a cgroup left
// frozen would freeze whatever is put in it next), and waits, within
// Timeout, until the process has exited. The process is not reaped: that
// is its parent's job. Kill is idempotent; after Thaw it fails with
// ErrReleased.
func (f *Frozen) Kill() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch f.state {
	case stateKilled:
		return nil
	case stateThawed:
		return opErr("kill", f.rec.PID, ErrReleased)
	}
	if err := kill(f.rec, f.pidfd); err != nil {
		return err
	}
	f.release(stateKilled)
	return nil
}

// kill sends SIGKILL to the process of pidfd, which rec froze, thaws its
// cgroup unless the freeze was inherited, and waits until it has exited.
func kill(rec Record, pidfd int) error {
	if err := signal(pidfd, unix.SIGKILL); err != nil {
		return opErr("pidfd_send_signal SIGKILL", rec.PID, err)
	}
	if rec.Method == MethodCgroup && !rec.Inherited {
		if err := writeFreeze(rec.Cgroup, false); err != nil && !errors.Is(err, unix.ENOENT) {
			return opErr("write 0 to "+rec.Cgroup+"/cgroup.freeze", rec.PID, err)
		}
	}
	if err := waitExit(pidfd, time.Now().Add(Timeout)); err != nil {
		return opErr("wait for exit after SIGKILL", rec.PID, err)
	}
	return nil
}

func (f *Frozen) release(s state) {
	f.state = s
	unix.Close(f.pidfd)
	f.pidfd = -1
}

// thaw undoes the freeze of rec; pidfd names the process for MethodSignal.
func thaw(rec Record, pidfd int) error {
	switch rec.Method {
	case MethodCgroup:
		err := writeFreeze(rec.Cgroup, false)
		if errors.Is(err, unix.ENOENT) {
			return nil // the cgroup is gone, and nothing in it is frozen
		}
		if err != nil {
			return opErr("write 0 to "+rec.Cgroup+"/cgroup.freeze", rec.PID, err)
		}
		err = waitFrozen(rec.Cgroup, false, time.Now().Add(Timeout))
		if err != nil && !errors.Is(err, unix.ENOENT) {
			return opErr("wait for frozen 0 in "+rec.Cgroup+"/cgroup.events", rec.PID, err)
		}
		return nil
	case MethodSignal:
		if err := signal(pidfd, unix.SIGCONT); err != nil {
			return opErr("pidfd_send_signal SIGCONT", rec.PID, err)
		}
		return nil
	}
	return opErr("thaw", rec.PID, ErrBadRecord)
}

// ThawRecord undoes a freeze from its Record, as "tcpmigrate recover" does
// after the process that froze it died. It does what Thaw would do, and
// nothing for an inherited freeze. A process that has exited is not an
// error; a pid that now names another process (another start time) fails
// with ErrPIDReused and is left alone. For MethodCgroup the cgroup is
// thawed whatever became of the process, and a cgroup that no longer
// exists is not an error; a path outside cgroup2 fails with ErrBadRecord.
func ThawRecord(rec Record) error {
	if err := rec.check("thaw record"); err != nil {
		return err
	}
	switch {
	case rec.Inherited:
		return nil
	case rec.Method == MethodCgroup:
		if gone, err := rec.cgroupGone("thaw record"); gone || err != nil {
			return err
		}
		return thaw(rec, -1)
	}
	pidfd, err := rec.open("thaw record")
	if pidfd < 0 {
		return err
	}
	defer unix.Close(pidfd)
	return thaw(rec, pidfd)
}

// KillRecord ends with SIGKILL the process of a Record, as "tcpmigrate
// recover" does when the process's connections were committed on the
// target after the agent that froze it died. It does what Kill does: the
// cgroup thawed unless the freeze was inherited (its path checked first,
// as ThawRecord checks it), and a wait, within Timeout, until the process
// has exited, so that its descriptors are gone when KillRecord returns. A
// process that has exited is not an error; a pid that now names another
// process fails with ErrPIDReused and is left alone.
func KillRecord(rec Record) error {
	if err := rec.check("kill record"); err != nil {
		return err
	}
	if rec.Method == MethodCgroup && !rec.Inherited {
		if _, err := rec.cgroupGone("kill record"); err != nil {
			return err
		}
	}
	pidfd, err := rec.open("kill record")
	if pidfd < 0 {
		return err
	}
	defer unix.Close(pidfd)
	return kill(rec, pidfd)
}

// check fails with ErrBadRecord unless rec describes a freeze: a pid, a
// method, and for MethodCgroup an absolute, clean path.
func (rec Record) check(op string) error {
	if rec.PID <= 0 || rec.Method != MethodSignal && rec.Method != MethodCgroup ||
		rec.Method == MethodCgroup && (!filepath.IsAbs(rec.Cgroup) || filepath.Clean(rec.Cgroup) != rec.Cgroup) {
		return opErr(op, rec.PID, ErrBadRecord)
	}
	return nil
}

// cgroupGone reports whether rec's cgroup no longer exists, and fails
// with ErrBadRecord if its path is not a cgroup2 directory.
func (rec Record) cgroupGone(op string) (bool, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(rec.Cgroup, &fs); err == unix.ENOENT {
		return true, nil
	} else if err != nil {
		return false, opErr("statfs "+rec.Cgroup, rec.PID, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return false, opErr(op+": "+rec.Cgroup+" is not a cgroup2 directory", rec.PID, ErrBadRecord)
	}
	return false, nil
}

// open returns a pidfd of rec's process, opened before its start time is
// compared with rec's, so that it names the process rec froze: -1 and no
// error when the process has exited, -1 and ErrPIDReused when the pid
// names another process now.
func (rec Record) open(op string) (int, error) {
	pidfd, err := unix.PidfdOpen(rec.PID, 0)
	if err == unix.ESRCH {
		return -1, nil
	}
	if err != nil {
		return -1, opErr("pidfd_open", rec.PID, err)
	}
	st, err := procStat(rec.PID)
	switch {
	case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH):
		err = nil
	case err != nil:
		err = opErr("read /proc/PID/stat", rec.PID, err)
	case st.startTime != rec.StartTime:
		err = opErr(op, rec.PID, ErrPIDReused)
	default:
		return pidfd, nil
	}
	unix.Close(pidfd)
	return -1, err
}
