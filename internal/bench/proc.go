package bench

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// vmHWM returns the peak resident set size of the calling process, in
// bytes, from /proc/self/status.
func vmHWM() (int64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, fmt.Errorf("bench: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("bench: VmHWM %q: %w", v, err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("bench: no VmHWM in /proc/self/status")
}

// raiseNoFile raises the soft descriptor limit to the hard one and checks
// that need descriptors fit. The hard limit cannot be raised without
// CAP_SYS_RESOURCE, which this machine's root does not hold.
func raiseNoFile(need int) error {
	var l unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &l); err != nil {
		return fmt.Errorf("bench: getrlimit: %w", err)
	}
	if l.Cur < l.Max {
		l.Cur = l.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &l); err != nil {
			return fmt.Errorf("bench: setrlimit: %w", err)
		}
	}
	if uint64(need) > l.Cur {
		return fmt.Errorf("bench: %d descriptors needed in one process, the limit is %d", need, l.Cur)
	}
	return nil
}

// loadAvg returns the 1, 5 and 15-minute load averages.
func loadAvg() [3]float64 {
	var l [3]float64
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return l
	}
	for i, f := range strings.Fields(string(b)) {
		if i == 3 {
			break
		}
		l[i], _ = strconv.ParseFloat(f, 64)
	}
	return l
}

func environment() Env {
	e := Env{Time: time.Now().UTC().Format(time.RFC3339), CPUs: runtime.NumCPU(), Go: runtime.Version(), LoadBefore: loadAvg()}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		e.Kernel = string(bytes.TrimRight(u.Release[:], "\x00"))
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				e.Revision = s.Value + e.Revision
			case "vcs.modified":
				if s.Value == "true" {
					e.Revision += "+modified"
				}
			}
		}
	}
	return e
}
