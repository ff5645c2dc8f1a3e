package freeze

import (
	"bufio"
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// cgroupPath returns the cgroup v2 path of process pid ("/a/b", relative to
// the caller's cgroup namespace), or "" when the process is in no v2
// hierarchy.
func cgroupPath(pid string) (string, error) {
	b, err := os.ReadFile("/proc/" + pid + "/cgroup")
	if err != nil {
		return "", err
	}
	for line := range strings.Lines(string(b)) {
		if p, ok := strings.CutPrefix(strings.TrimRight(line, "\n"), "0::"); ok {
			return p, nil
		}
	}
	return "", nil
}

// v2Mount finds the cgroup2 mount of the caller's mount namespace: its
// mount point and the cgroup path of its root (the "root" field of
// /proc/self/mountinfo). On a hybrid host it is /sys/fs/cgroup/unified.
func v2Mount() (mountpoint, root string, err error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok || !strings.HasPrefix(post, "cgroup2 ") {
			continue
		}
		fields := strings.Fields(pre)
		if len(fields) < 5 {
			continue
		}
		return unescapeMount(fields[4]), unescapeMount(fields[3]), nil
	}
	if err := sc.Err(); err != nil {
		return "", "", err
	}
	return "", "", fs.ErrNotExist
}

// unescapeMount undoes the octal escapes (\040 for a space) of mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// within says whether cgroup path p is c or below it.
func within(p, c string) bool {
	return p == c || c == "/" || strings.HasPrefix(p, c+"/")
}

// cgroupRule applies the package's rule to the cgroup paths of the target
// and of the caller, and says why the freezer cannot be used ("" when it
// can). Paths are as /proc/PID/cgroup shows them.
func cgroupRule(target, self string) string {
	switch {
	case target == "":
		return "not in a cgroup v2 hierarchy"
	case !strings.HasPrefix(target, "/") || strings.HasPrefix(target, "/..") || strings.Contains(target, "/../"):
		return "cgroup " + target + " is outside our cgroup namespace"
	case target == "/":
		return "in the root cgroup"
	case self != "" && within(self, target):
		return "cgroup " + target + " holds the caller too"
	}
	return ""
}

// cgroupDir finds the cgroup process pid should be frozen with. It returns
// "" when the rule says SIGSTOP instead (cgroupRule, or no usable cgroup2
// freezer for it, or another process in the cgroup); an error only for a
// failure to read what the rule needs.
func cgroupDir(pid int) (string, error) {
	ps := strconv.Itoa(pid)
	target, err := cgroupPath(ps)
	if err != nil {
		return "", opErr("read /proc/PID/cgroup", pid, unwrapPath(err))
	}
	self, err := cgroupPath("self")
	if err != nil {
		return "", opErr("read /proc/self/cgroup", pid, unwrapPath(err))
	}
	if cgroupRule(target, self) != "" {
		return "", nil
	}
	mnt, root, err := v2Mount()
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil // cgroup2 is not mounted
	}
	if err != nil {
		return "", opErr("read /proc/self/mountinfo", pid, err)
	}
	if !within(target, root) {
		return "", nil // the cgroup is outside the cgroup2 mount
	}
	dir := filepath.Join(mnt, strings.TrimPrefix(target, root))
	if _, err := os.Stat(filepath.Join(dir, "cgroup.freeze")); err != nil {
		return "", nil // no cgroup.freeze (Linux 5.2+)
	}
	other, err := otherProcess(dir, pid)
	if err != nil {
		return "", opErr("read cgroup.procs under "+dir, pid, err)
	}
	if other != 0 {
		return "", nil // the cgroup also holds another process
	}
	return dir, nil
}

// otherProcess returns a process other than pid in cgroup dir or below it,
// or 0 when there is none.
func otherProcess(dir string, pid int) (int, error) {
	var other int
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // a child cgroup removed during the walk
		}
		if err != nil || !d.IsDir() {
			return err
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return unwrapPath(err)
		}
		for f := range strings.FieldsSeq(string(b)) {
			if n, err := strconv.Atoi(f); err == nil && n != pid {
				other = n
				return fs.SkipAll
			}
		}
		return nil
	})
	return other, err
}

// readFreeze says whether cgroup dir is set to be frozen (cgroup.freeze).
func readFreeze(dir string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.freeze"))
	if err != nil {
		return false, unwrapPath(err)
	}
	return string(bytes.TrimSpace(b)) == "1", nil
}

// writeFreeze sets cgroup.freeze of dir.
func writeFreeze(dir string, frozen bool) error {
	v := []byte("0")
	if frozen {
		v = []byte("1")
	}
	f, err := os.OpenFile(filepath.Join(dir, "cgroup.freeze"), os.O_WRONLY, 0)
	if err != nil {
		return unwrapPath(err)
	}
	_, err = f.Write(v)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return unwrapPath(err)
}

// waitFrozen waits until cgroup.events of dir says "frozen 1" (want true)
// or "frozen 0", until the deadline. The kernel signals a change of the
// file with POLLPRI; the poll is also bounded to a short interval, so a
// missed notification costs a little time, never the wait.
func waitFrozen(dir string, want bool, deadline time.Time) error {
	f, err := os.Open(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return unwrapPath(err)
	}
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	buf := make([]byte, 256)
	for {
		n, err := f.ReadAt(buf, 0)
		if n == 0 && err != nil {
			return unwrapPath(err)
		}
		if frozen, ok := eventsFrozen(buf[:n]); ok && frozen == want {
			return nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return ErrTimeout
		}
		var perr error
		if err := rc.Control(func(fd uintptr) {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLPRI}}
			_, perr = unix.Poll(fds, int(min(left, 50*time.Millisecond)/time.Millisecond)+1)
		}); err != nil {
			return err
		}
		if perr != nil && perr != unix.EINTR {
			return perr
		}
	}
}

// eventsFrozen reads the "frozen" key of cgroup.events.
func eventsFrozen(b []byte) (frozen, ok bool) {
	for line := range bytes.Lines(b) {
		if v, found := bytes.CutPrefix(bytes.TrimSpace(line), []byte("frozen ")); found {
			return string(v) == "1", true
		}
	}
	return false, false
}
