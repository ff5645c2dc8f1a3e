package freeze_test

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/freeze"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/procsock"
)

// relay is an unmodified socat on an application host that copies what a
// peer sends on one connection (in) to another connection to the peer
// (out).
type relay struct {
	p       *proc
	in, out net.Conn
	inAddr  netip.AddrPort // the peer's end of in
}

func newRelay(t *testing.T) *relay {
	t.Helper()
	if _, err := exec.LookPath("socat"); err != nil {
		lab.Skip(t, "socat is not installed")
	}
	lan := lab.NewTestLAN(t, "app", "peer")
	app, peer := lan.Host("app"), lan.Host("peer")
	if err := app.AddAddr(netip.MustParsePrefix("198.18.0.1/24")); err != nil {
		t.Fatal(err)
	}
	if err := peer.AddAddr(netip.MustParsePrefix("198.18.0.2/24")); err != nil {
		t.Fatal(err)
	}
	var lns [2]net.Listener
	for i := range lns {
		if err := peer.Do(func() (err error) {
			lns[i], err = net.Listen("tcp4", "198.18.0.2:0")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer lns[i].Close()
	}
	cmd := app.Command("socat", "-u", "TCP4:"+lns[0].Addr().String(), "TCP4:"+lns[1].Addr().String())
	r := &relay{p: startProc(t, cmd), inAddr: netip.MustParseAddrPort(lns[0].Addr().String())}
	for i, c := range []*net.Conn{&r.in, &r.out} {
		lns[i].(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
		var err error
		if *c, err = lns[i].Accept(); err != nil {
			t.Fatalf("socat did not connect: %v", err)
		}
		t.Cleanup(func() { (*c).Close() })
	}
	// socat has connected, so "ip netns exec" has become socat.
	if exe, err := os.Readlink("/proc/" + itoa(r.p.pid) + "/exe"); err != nil || !strings.HasSuffix(exe, "/socat") {
		t.Fatalf("pid %d runs %q (%v), want socat", r.p.pid, exe, err)
	}
	return r
}

// copies checks that socat relays msg.
func (r *relay) copies(t *testing.T, msg string) {
	t.Helper()
	if _, err := r.in.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	r.received(t, msg)
}

// received checks that msg comes out of socat, within 10 seconds.
func (r *relay) received(t *testing.T, msg string) {
	t.Helper()
	r.out.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(r.out, buf); err != nil || string(buf) != msg {
		t.Fatalf("socat relayed %q, %v; want %q", buf, err, msg)
	}
}

// stuck sends msg and checks that socat does not read it: the bytes reach
// socat's receive queue (sock_diag says so) and stay there, and nothing
// comes out of the relay within a short deadline.
func (r *relay) stuck(t *testing.T, msg string) {
	t.Helper()
	if _, err := r.in.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	var socks []procsock.Socket
	lab.WaitFor(t, "the bytes to reach socat's receive queue", func() (bool, string) {
		var err error
		if socks, err = procsock.List(r.p.pid); err != nil {
			t.Fatal(err)
		}
		for _, s := range socks {
			if s.Remote == r.inAddr {
				return s.RecvQ == uint32(len(msg)), "RecvQ " + itoa(int(s.RecvQ))
			}
		}
		return false, "no connection to " + r.inAddr.String()
	})
	r.out.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := r.out.Read(make([]byte, 64)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a frozen socat relayed %d bytes (%v)", n, err)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

// frozenState checks that the process is held still by f's method.
func frozenState(t *testing.T, f *freeze.Frozen, pid int) {
	t.Helper()
	switch f.Method() {
	case freeze.MethodSignal:
		if st := threadStates(t, pid); !allT(st) {
			t.Fatalf("thread states %q after Freeze, want all T", st)
		}
	case freeze.MethodCgroup:
		if v := frozenEvent(t, f.Cgroup()); v != "1" {
			t.Fatalf("cgroup.events says frozen %s after Freeze", v)
		}
	default:
		t.Fatalf("method %v", f.Method())
	}
}

// thawedState checks that the process runs again after f.Thaw.
func thawedState(t *testing.T, f *freeze.Frozen, pid int) {
	t.Helper()
	switch f.Method() {
	case freeze.MethodSignal:
		lab.WaitFor(t, "the threads to leave state T", func() (bool, string) {
			st := threadStates(t, pid)
			return noneT(st), st
		})
	case freeze.MethodCgroup:
		if v := frozenEvent(t, f.Cgroup()); v != "0" {
			t.Fatalf("cgroup.events says frozen %s after Thaw", v)
		}
	}
}

var modes = []struct {
	name   string
	method freeze.Method
}{{"signal", freeze.MethodSignal}, {"cgroup", freeze.MethodCgroup}}

func TestFreezeThaw(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			r := newRelay(t)
			pid := r.p.pid
			var dir string
			if m.method == freeze.MethodCgroup {
				dir = newCgroup(t)
				moveTo(t, dir, pid)
			}
			r.copies(t, "before")

			f, err := freeze.Freeze(pid)
			if err != nil {
				t.Fatal(err)
			}
			rec := f.Record()
			if f.Method() != m.method || rec.Method != m.method || rec.PID != pid || f.PID() != pid ||
				rec.Cgroup != dir || f.Cgroup() != dir || rec.StartTime == 0 || rec.Inherited || f.Inherited() {
				t.Fatalf("Freeze(%d): record %+v, want method %v, cgroup %q", pid, rec, m.method, dir)
			}
			frozenState(t, f, pid)
			r.stuck(t, "during")

			// A second Freeze finds the process frozen: it inherits the
			// freeze and its Thaw leaves the process frozen.
			g, err := freeze.Freeze(pid)
			if err != nil {
				t.Fatal(err)
			}
			if !g.Inherited() || g.Method() != m.method {
				t.Errorf("second Freeze: inherited %v method %v", g.Inherited(), g.Method())
			}
			if err := g.Thaw(); err != nil {
				t.Fatal(err)
			}
			frozenState(t, f, pid)

			if err := f.Thaw(); err != nil {
				t.Fatal(err)
			}
			thawedState(t, f, pid)
			r.received(t, "during")
			r.copies(t, "after")

			if err := f.Thaw(); err != nil {
				t.Errorf("second Thaw: %v", err)
			}
			if err := f.Kill(); !errors.Is(err, freeze.ErrReleased) {
				t.Errorf("Kill after Thaw: %v, want ErrReleased", err)
			}
			r.copies(t, "still running")
		})
	}
}

func TestKill(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			lab.Require(t)
			var dir string
			if m.method == freeze.MethodCgroup {
				dir = newCgroup(t)
			}
			p := startSleeper(t)
			if dir != "" {
				moveTo(t, dir, p.pid)
			}
			f, err := freeze.Freeze(p.pid)
			if err != nil {
				t.Fatal(err)
			}
			if f.Method() != m.method {
				t.Fatalf("method %v, want %v", f.Method(), m.method)
			}
			frozenState(t, f, p.pid)
			if err := f.Kill(); err != nil {
				t.Fatal(err)
			}
			if st := p.waitExit(t); !killedBySIGKILL(st) {
				t.Errorf("process ended with %v, want SIGKILL", st)
			}
			if dir != "" {
				if v := frozenEvent(t, dir); v != "0" {
					t.Errorf("cgroup left frozen %s after Kill", v)
				}
			}
			if err := f.Kill(); err != nil {
				t.Errorf("second Kill: %v", err)
			}
			if err := f.Thaw(); err != nil {
				t.Errorf("Thaw after Kill: %v", err)
			}
		})
	}
}

// TestThreads checks that SIGSTOP holds every thread of a multi-threaded
// process, not only the one the pid names.
func TestThreads(t *testing.T) {
	lab.Require(t)
	p := startSleeper(t)
	if st := threadStates(t, p.pid); len(st) < 4 {
		t.Fatalf("sleeper has %d threads, want at least 4", len(st))
	}
	f, err := freeze.Freeze(p.pid)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Thaw()
	if f.Method() != freeze.MethodSignal {
		t.Fatalf("a process in the test's own cgroup was frozen with %v", f.Method())
	}
	if st := threadStates(t, p.pid); !allT(st) {
		t.Errorf("thread states %q, want all T", st)
	}
}

// TestRule checks when the cgroup freezer is used and when not.
func TestRule(t *testing.T) {
	lab.Require(t)
	dir := newCgroup(t)
	method := func(pid int) freeze.Method {
		t.Helper()
		f, err := freeze.Freeze(pid)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Thaw(); err != nil {
			t.Fatal(err)
		}
		return f.Method()
	}
	a, b := startSleeper(t), startSleeper(t)
	if m := method(a.pid); m != freeze.MethodSignal {
		t.Errorf("process in the test's own cgroup: %v, want sigstop", m)
	}
	moveTo(t, dir, a.pid)
	if m := method(a.pid); m != freeze.MethodCgroup {
		t.Errorf("process alone in its cgroup: %v, want cgroup", m)
	}
	moveTo(t, dir, b.pid)
	if m := method(a.pid); m != freeze.MethodSignal {
		t.Errorf("process sharing its cgroup: %v, want sigstop", m)
	}
	child := dir + "/child"
	if err := os.Mkdir(child, 0o755); err != nil {
		t.Fatal(err)
	}
	moveTo(t, child, b.pid)
	if m := method(a.pid); m != freeze.MethodSignal {
		t.Errorf("process with another one in a child cgroup: %v, want sigstop", m)
	}
	if m := method(b.pid); m != freeze.MethodCgroup {
		t.Errorf("process alone in the child cgroup: %v, want cgroup", m)
	}
}

// TestRecover freezes a process from an agent process that exits without
// thawing it, as an agent that dies does: the process stays frozen, and
// ThawRecord, given the agent's journal record, thaws it.
func TestRecover(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			p, dir, rec, held := frozenByDeadAgent(t, m.method)
			if m.method == freeze.MethodSignal {
				reused := rec
				reused.StartTime++
				if err := freeze.ThawRecord(reused); !errors.Is(err, freeze.ErrPIDReused) {
					t.Errorf("ThawRecord with another start time: %v, want ErrPIDReused", err)
				}
				if !held() {
					t.Errorf("ThawRecord of a reused pid resumed the process")
				}
			}
			if err := freeze.ThawRecord(rec); err != nil {
				t.Fatal(err)
			}
			lab.WaitFor(t, "the process to run again", func() (bool, string) {
				st := threadStates(t, p.pid)
				if dir != "" {
					return frozenEvent(t, dir) == "0", "frozen " + frozenEvent(t, dir)
				}
				return noneT(st), st
			})
			if err := freeze.ThawRecord(rec); err != nil {
				t.Errorf("second ThawRecord: %v", err)
			}
		})
	}
}

// TestRecoverKill is TestRecover for a migration that committed: KillRecord
// kills the process the dead agent froze, and has waited for its exit when
// it returns; a record whose pid names another process now (another start
// time) kills nothing.
func TestRecoverKill(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			p, dir, rec, held := frozenByDeadAgent(t, m.method)
			reused := rec
			reused.StartTime++
			if err := freeze.KillRecord(reused); !errors.Is(err, freeze.ErrPIDReused) {
				t.Errorf("KillRecord with another start time: %v, want ErrPIDReused", err)
			}
			if !held() {
				t.Errorf("KillRecord of a reused pid touched the process")
			}
			if err := freeze.KillRecord(rec); err != nil {
				t.Fatal(err)
			}
			// The process has exited when KillRecord returns: a zombie (Z),
			// being reaped by the test's goroutine (X, EXIT_DEAD), or gone.
			if b, err := os.ReadFile("/proc/" + itoa(p.pid) + "/stat"); err == nil && !strings.Contains(string(b), ") Z ") && !strings.Contains(string(b), ") X ") {
				t.Errorf("KillRecord returned with the process alive: %s", b)
			}
			if st := p.waitExit(t); !killedBySIGKILL(st) {
				t.Errorf("process ended with %v, want SIGKILL", st)
			}
			if dir != "" {
				if v := frozenEvent(t, dir); v != "0" {
					t.Errorf("cgroup left frozen %s after KillRecord", v)
				}
			}
			if err := freeze.KillRecord(rec); err != nil {
				t.Errorf("second KillRecord: %v", err)
			}
		})
	}
}

// frozenByDeadAgent freezes a new sleeper (in a cgroup of its own for
// MethodCgroup, whose directory it returns) from an agent process that
// exits without thawing it, and returns the record the agent wrote and a
// check that the sleeper is still held.
func frozenByDeadAgent(t *testing.T, method freeze.Method) (p *proc, dir string, rec freeze.Record, held func() bool) {
	t.Helper()
	lab.Require(t)
	if method == freeze.MethodCgroup {
		dir = newCgroup(t)
	}
	p = startSleeper(t)
	if dir != "" {
		moveTo(t, dir, p.pid)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	agent := exec.Command(exe, itoa(p.pid))
	agent.Env = append(os.Environ(), helperEnv+"=agent")
	agent.Stderr = os.Stderr
	journal, err := agent.Output()
	if err != nil {
		t.Fatalf("agent: %v", err)
	}
	if err := json.Unmarshal(journal, &rec); err != nil {
		t.Fatalf("journal %q: %v", journal, err)
	}
	if rec.PID != p.pid || rec.Method != method || rec.Cgroup != dir ||
		!strings.Contains(string(journal), `"method":"`+method.String()+`"`) {
		t.Fatalf("journal %s, want pid %d method %v cgroup %q", journal, p.pid, method, dir)
	}
	// The agent is gone; the process is still frozen.
	held = func() bool {
		if dir != "" {
			return frozenEvent(t, dir) == "1"
		}
		return allT(threadStates(t, p.pid))
	}
	if !held() {
		t.Fatalf("process not frozen after its agent exited")
	}
	return p, dir, rec, held
}

func TestErrors(t *testing.T) {
	lab.Require(t)
	check := func(name string, err, want error, pid int) {
		t.Helper()
		var fe *freeze.Error
		if !errors.Is(err, want) || !errors.As(err, &fe) || fe.PID != pid || !strings.HasPrefix(err.Error(), "freeze: ") {
			t.Errorf("%s: %v, want %v naming pid %d", name, err, want, pid)
		}
	}
	_, err := freeze.Freeze(os.Getpid())
	check("Freeze of itself", err, freeze.ErrSelf, os.Getpid())
	_, err = freeze.Freeze(1 << 30)
	check("Freeze of a missing pid", err, unix.ESRCH, 1<<30)

	zombie := exec.Command("true")
	if err := zombie.Start(); err != nil {
		t.Fatal(err)
	}
	defer zombie.Wait()
	lab.WaitFor(t, "a zombie", func() (bool, string) {
		st := threadStates(t, zombie.Process.Pid)
		return st == "Z", st
	})
	_, err = freeze.Freeze(zombie.Process.Pid)
	check("Freeze of a zombie", err, freeze.ErrExited, zombie.Process.Pid)

	for _, rec := range []freeze.Record{
		{PID: 1},
		{PID: 1, Method: freeze.MethodCgroup, Cgroup: "relative/path"},
		{PID: 1, Method: freeze.MethodCgroup, Cgroup: os.TempDir()},
		{PID: 0, Method: freeze.MethodSignal},
	} {
		check("ThawRecord of "+itoa(rec.PID)+" "+rec.Cgroup, freeze.ThawRecord(rec), freeze.ErrBadRecord, rec.PID)
	}
	var m freeze.Method
	if err := m.UnmarshalText([]byte("thaw")); !errors.Is(err, freeze.ErrBadRecord) {
		t.Errorf("UnmarshalText of an unknown method: %v", err)
	}
}
