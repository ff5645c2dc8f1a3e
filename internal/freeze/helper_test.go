package freeze_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/tcpmigrate/tcpmigrate/internal/freeze"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// helperEnv makes the test binary act as a program of the tests instead of
// running them: "sleeper" (a process with several threads that waits for
// its stdin to close) or "agent" (freezes the pid in its argument, prints
// the Record and exits without thawing, as an agent that dies would).
const helperEnv = "FREEZE_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "sleeper":
		for range 3 {
			go func() {
				runtime.LockOSThread()
				select {}
			}()
		}
		fmt.Println("ready")
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	case "agent":
		pid, _ := strconv.Atoi(os.Args[1])
		f, err := freeze.Freeze(pid)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		json.NewEncoder(os.Stdout).Encode(f.Record())
		os.Exit(0)
	}
	// Every goroutine a test starts (acceptors, pipe readers, reapers) ends
	// with the test's cleanups, and InNetNS leaves none behind.
	goleak.VerifyTestMain(m)
}

// proc is a child process of a test. It is killed and reaped when the test
// ends, whatever state it is in.
type proc struct {
	cmd    *exec.Cmd
	pid    int
	exited chan struct{}
	status atomic.Pointer[os.ProcessState]
}

// startProc starts cmd with a stdin pipe that stays open until the test
// ends, and reaps it in the background.
func startProc(t *testing.T, cmd *exec.Cmd) *proc {
	t.Helper()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if cmd.Stderr == nil {
		cmd.Stderr = os.Stderr
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, pid: cmd.Process.Pid, exited: make(chan struct{})}
	go func() {
		cmd.Wait()
		p.status.Store(cmd.ProcessState)
		close(p.exited)
	}()
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill() // SIGKILL ends stopped and cgroup-frozen processes alike
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("pid %d not reaped 10s after SIGKILL", p.pid)
		}
	})
	return p
}

// startSleeper starts the multi-threaded sleeper and waits until it is ready.
func startSleeper(t *testing.T) *proc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), helperEnv+"=sleeper")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := startProc(t, cmd)
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(out).ReadString('\n')
		if err == nil && line != "ready\n" {
			err = fmt.Errorf("said %q", line)
		}
		ready <- err
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("sleeper pid %d not ready: %v", p.pid, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("sleeper pid %d not ready after 10s", p.pid)
	}
	return p
}

// waitExit waits for the process to exit and returns how.
func (p *proc) waitExit(t *testing.T) *os.ProcessState {
	t.Helper()
	select {
	case <-p.exited:
		return p.status.Load()
	case <-time.After(10 * time.Second):
		t.Fatalf("pid %d did not exit", p.pid)
		return nil
	}
}

// threadStates returns the state letter of every thread of pid.
func threadStates(t *testing.T, pid int) string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range ents {
		s, err := os.ReadFile(filepath.Join(dir, e.Name(), "stat"))
		if err != nil {
			continue
		}
		rest := string(s[strings.LastIndexByte(string(s), ')')+2:])
		b.WriteByte(rest[0])
	}
	return b.String()
}

func allT(states string) bool {
	return states != "" && strings.Trim(states, "T") == ""
}

func noneT(states string) bool {
	return states != "" && !strings.Contains(states, "T")
}

var cgroupCounter atomic.Uint32

// newCgroup creates an empty cgroup v2 directory owned by the test under
// the root of the cgroup2 mount and removes it when the test ends, killing
// whatever is still in it. It skips the test where cgroup v2 is missing,
// unless CI=true.
func newCgroup(t *testing.T) string {
	t.Helper()
	lab.Require(t)
	mnt := cgroup2Mount(t)
	dir := filepath.Join(mnt, fmt.Sprintf("tcpmigrate-test-%d-%d", os.Getpid(), cgroupCounter.Add(1)))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "cgroup.freeze")); err != nil {
		os.Remove(dir)
		lab.Skip(t, "no cgroup v2 freezer (Linux 5.2+): "+err.Error())
	}
	t.Cleanup(func() { removeCgroup(t, dir) })
	return dir
}

func removeCgroup(t *testing.T, dir string) {
	os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte("0"), 0)
	os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	deadline := time.Now().Add(10 * time.Second)
	for {
		// Children first: WalkDir lists parents before children.
		var dirs []string
		filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		var err error
		for i := len(dirs) - 1; i >= 0; i-- {
			if e := os.Remove(dirs[i]); e != nil && !errors.Is(e, os.ErrNotExist) {
				err = e
			}
		}
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("remove cgroup %s: %v", dir, err)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func cgroup2Mount(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		pre, post, _ := strings.Cut(line, " - ")
		if f := strings.Fields(pre); strings.HasPrefix(post, "cgroup2 ") && len(f) >= 5 && f[3] == "/" {
			return f[4]
		}
	}
	lab.Skip(t, "cgroup2 is not mounted")
	return ""
}

// moveTo puts process pid into cgroup dir.
func moveTo(t *testing.T, dir string, pid int) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		t.Fatalf("move pid %d to %s: %v", pid, dir, err)
	}
}

// frozenEvent reads "frozen" from the cgroup's cgroup.events.
func frozenEvent(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "frozen "); ok {
			return v
		}
	}
	t.Fatalf("no frozen key in %s/cgroup.events: %q", dir, b)
	return ""
}

// killedBySIGKILL says whether the process state is a death by SIGKILL.
func killedBySIGKILL(st *os.ProcessState) bool {
	ws, ok := st.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}
