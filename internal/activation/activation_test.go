package activation

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// childEnv makes the test binary act as a socket-activated program (see
// childMain) instead of running tests.
const childEnv = "ACTIVATION_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(childMain())
	}
	goleak.VerifyTestMain(m)
}

// conn is one inherited descriptor as the child saw it.
type conn struct {
	Name           string
	Local, Remote  netip.AddrPort // decoded from the name
	SockLocal      netip.AddrPort // getsockname of the descriptor
	SockRemote     netip.AddrPort // getpeername of the descriptor
	Blocking       bool           // O_NONBLOCK clear when inherited
	CloexecInherit bool           // FD_CLOEXEC when inherited (must be false)
	CloexecAfter   bool           // FD_CLOEXEC after Files (must be true)
	DecodeErr      string
}

// report is what the child prints on stdout.
type report struct {
	PID                  int
	ListenPID, ListenFDs string
	ListenFDNames        string
	EnvLeftAfterFiles    bool
	Conns                []conn
	FilesErr             string
}

// childMain is the socket-activated program: it reports what it inherited
// and greets each peer through its socket.
func childMain() int {
	r := report{
		PID:           os.Getpid(),
		ListenPID:     os.Getenv(EnvPID),
		ListenFDs:     os.Getenv(EnvFDs),
		ListenFDNames: os.Getenv(EnvFDNames),
	}
	n, _ := strconv.Atoi(r.ListenFDs)
	r.Conns = make([]conn, n)
	for i := range r.Conns {
		fd := uintptr(FirstFD + i)
		fl, _ := unix.FcntlInt(fd, unix.F_GETFL, 0)
		fdfl, _ := unix.FcntlInt(fd, unix.F_GETFD, 0)
		r.Conns[i].Blocking = fl&unix.O_NONBLOCK == 0
		r.Conns[i].CloexecInherit = fdfl&unix.FD_CLOEXEC != 0
	}
	files, err := Files(true)
	if err != nil {
		r.FilesErr = err.Error()
	}
	_, a := os.LookupEnv(EnvPID)
	_, b := os.LookupEnv(EnvFDs)
	_, c := os.LookupEnv(EnvFDNames)
	r.EnvLeftAfterFiles = a || b || c
	for i, f := range files {
		if i >= len(r.Conns) {
			break
		}
		cn := &r.Conns[i]
		cn.Name = f.Name()
		fdfl, _ := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0)
		cn.CloexecAfter = fdfl&unix.FD_CLOEXEC != 0
		if cn.Local, cn.Remote, err = ParseName(f.Name()); err != nil {
			cn.DecodeErr = err.Error()
		}
		if sa, err := unix.Getsockname(int(f.Fd())); err == nil {
			cn.SockLocal = lab.AddrPort(sa)
		}
		if sa, err := unix.Getpeername(int(f.Fd())); err == nil {
			cn.SockRemote = lab.AddrPort(sa)
		}
		fmt.Fprintf(f, "hello from pid %d via %s\n", os.Getpid(), f.Name())
		f.Close()
	}
	json.NewEncoder(os.Stdout).Encode(r)
	return 0
}

// pair is an established TCP connection in the test namespace; served is
// the end a child inherits, peer the far end the test keeps.
type pair struct {
	peer, served  *net.TCPConn
	local, remote netip.AddrPort // of served
}

var (
	srv4 = netip.MustParseAddr("198.18.0.10")
	cli4 = netip.MustParseAddr("198.18.0.1")
	srv6 = netip.MustParseAddr("fd00::10")
	cli6 = netip.MustParseAddr("fd00::1")
)

// newPair connects cli to srv inside a fresh namespace whose loopback holds
// the test addresses. srv may be the IPv6 unspecified address, to get an
// IPv4-mapped socket.
func newPair(t *testing.T, ns *lab.NS, srv, cli netip.Addr) pair {
	t.Helper()
	var p pair
	err := ns.Do(func() error {
		ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(srv, 0)))
		if err != nil {
			return err
		}
		defer ln.Close()
		dst := ln.Addr().(*net.TCPAddr).AddrPort()
		if srv.IsUnspecified() {
			dst = netip.AddrPortFrom(srv4, dst.Port())
		}
		if p.peer, err = net.DialTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(cli, 0)), net.TCPAddrFromAddrPort(dst)); err != nil {
			return err
		}
		p.served, err = ln.AcceptTCP()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.peer.Close()
		p.served.Close()
	})
	f, err := p.served.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if p.local, p.remote, err = lab.SockAddrs(f); err != nil {
		t.Fatal(err)
	}
	return p
}

// newNS returns a fresh network namespace whose loopback carries the test
// addresses.
func newNS(t *testing.T) *lab.NS {
	t.Helper()
	return lab.NewTestNS(t, "activation", srv4, cli4, srv6, cli6)
}

// handOver gives the served ends of pairs to Command as files with their
// names, and closes the test's net.Conns of them. The files are made the
// way a socket received over fdpass is (os.NewFile of a non-blocking
// descriptor), which exec.Cmd leaves non-blocking: Command must fix that.
func handOver(t *testing.T, pairs []pair) ([]*os.File, []string) {
	t.Helper()
	files := make([]*os.File, len(pairs))
	names := make([]string, len(pairs))
	for i, p := range pairs {
		rc, err := p.served.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var fd int
		var derr error
		rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) })
		if derr != nil {
			t.Fatal(derr)
		}
		p.served.Close()
		if fl, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); fl&unix.O_NONBLOCK == 0 {
			t.Fatal("the test socket is blocking already: the blocking check would prove nothing")
		}
		files[i] = os.NewFile(uintptr(fd), "served")
		if names[i], err = Name(p.local, p.remote); err != nil {
			t.Fatal(err)
		}
	}
	return files, names
}

// TestSocatServesInheritedSocket starts socat, an unmodified program, on an
// inherited established connection (FD:3) with cat behind it, and checks
// from the far end that it echoes, then that it ends cleanly on EOF.
func TestSocatServesInheritedSocket(t *testing.T) {
	ns := newNS(t)
	for _, c := range []struct {
		name     string
		srv, cli netip.Addr
	}{{"ipv4", srv4, cli4}, {"ipv6", srv6, cli6}} {
		t.Run(c.name, func(t *testing.T) {
			p := newPair(t, ns, c.srv, c.cli)
			files, names := handOver(t, []pair{p})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			cmd, err := Command(ctx, "socat", []string{"FD:3", "EXEC:cat"}, files, names)
			if err != nil {
				t.Fatal(err)
			}
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			files[0].Close() // the child's copy is the only one now

			p.peer.SetDeadline(time.Now().Add(10 * time.Second))
			msg := []byte("echo me through socat and cat\n")
			for i := 0; i < 3; i++ {
				if _, err := p.peer.Write(msg); err != nil {
					t.Fatal(err)
				}
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(p.peer, got); err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("round %d: peer read %q, %v; want the echo", i, got, err)
				}
			}
			p.peer.CloseWrite()
			if rest, err := io.ReadAll(p.peer); err != nil || len(rest) != 0 {
				t.Errorf("after EOF the peer read %q, %v; want a clean EOF", rest, err)
			}
			if err := cmd.Wait(); err != nil {
				t.Errorf("socat: %v: %s", err, stderr.Bytes())
			}
		})
	}
}

// TestChildSeesActivationEnvironment re-executes the test binary as the
// activated program. It checks that LISTEN_PID is the program's own pid
// (not the shell's parent, not ours), that LISTEN_FDS and LISTEN_FDNAMES are
// right, that the names decode back to the addresses (IPv4, IPv6 and
// IPv4-mapped) of the very sockets at descriptors 3, 4, 5, that those are
// blocking and inherited without close-on-exec, and that Files sets
// close-on-exec and clears the environment. Each peer then gets a greeting
// through its socket.
func TestChildSeesActivationEnvironment(t *testing.T) {
	ns := newNS(t)
	pairs := []pair{
		newPair(t, ns, srv4, cli4),
		newPair(t, ns, srv6, cli6),
		newPair(t, ns, netip.IPv6Unspecified(), cli4),
	}
	if !pairs[2].local.Addr().Is4In6() {
		t.Fatalf("third pair is not IPv4-mapped: %v", pairs[2].local)
	}
	files, names := handOver(t, pairs)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd, err := Command(ctx, self, []string{"-test.run=^$"}, files, names)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Env = append(cmd.Env, childEnv+"=1")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		f.Close()
	}
	for i, p := range pairs {
		p.peer.SetReadDeadline(time.Now().Add(10 * time.Second))
		line, err := io.ReadAll(p.peer) // the child writes, then closes: EOF
		want := fmt.Sprintf("hello from pid %d via %s\n", cmd.Process.Pid, names[i])
		if err != nil || string(line) != want {
			t.Errorf("peer %d read %q, %v; want %q", i, line, err, want)
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v: %s", err, stderr.Bytes())
	}
	var r report
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		t.Fatalf("child output %q: %v", stdout.Bytes(), err)
	}
	if r.PID != cmd.Process.Pid || r.ListenPID != strconv.Itoa(r.PID) {
		t.Errorf("child pid %d, LISTEN_PID %q, started pid %d: want all equal", r.PID, r.ListenPID, cmd.Process.Pid)
	}
	if r.ListenFDs != "3" || r.ListenFDNames != strings.Join(names, ":") {
		t.Errorf("LISTEN_FDS=%q LISTEN_FDNAMES=%q", r.ListenFDs, r.ListenFDNames)
	}
	if r.FilesErr != "" || r.EnvLeftAfterFiles {
		t.Errorf("Files: %s; environment left: %v", r.FilesErr, r.EnvLeftAfterFiles)
	}
	if len(r.Conns) != len(pairs) {
		t.Fatalf("child saw %d descriptors", len(r.Conns))
	}
	for i, c := range r.Conns {
		p := pairs[i]
		if c.Name != names[i] || c.DecodeErr != "" || c.Local != p.local || c.Remote != p.remote {
			t.Errorf("fd %d: name %q decoded to %v -> %v (%s); want %v -> %v", FirstFD+i, c.Name, c.Local, c.Remote, c.DecodeErr, p.local, p.remote)
		}
		if c.SockLocal != p.local || c.SockRemote != p.remote {
			t.Errorf("fd %d is the socket %v -> %v, want %v -> %v", FirstFD+i, c.SockLocal, c.SockRemote, p.local, p.remote)
		}
		if !c.Blocking || c.CloexecInherit || !c.CloexecAfter {
			t.Errorf("fd %d: blocking %v, close-on-exec when inherited %v, after Files %v; want true, false, true", FirstFD+i, c.Blocking, c.CloexecInherit, c.CloexecAfter)
		}
	}
	t.Logf("LISTEN_FDNAMES=%s", r.ListenFDNames)
}

// TestCommandDoesNotParseArguments: arguments and the program path reach
// the program verbatim, whatever shell syntax they contain.
func TestCommandDoesNotParseArguments(t *testing.T) {
	dir := t.TempDir()
	printf, err := exec.LookPath("printf")
	if err != nil {
		t.Fatal(err)
	}
	odd := filepath.Join(dir, `-odd name $(touch PWNED) ';' "x"`)
	if err := os.Symlink(printf, odd); err != nil {
		t.Fatal(err)
	}
	args := []string{"%s|", "a b", "$(touch PWNED)", "`touch PWNED`", "';touch PWNED;'", `"`, "*", "-n", "$0", "$@", "$$", "\\", "\n"}
	for _, name := range []string{"printf", odd} {
		cmd, err := Command(context.Background(), name, args, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		cmd.Dir = dir
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if want := strings.Join(args[1:], "|") + "|"; string(out) != want {
			t.Errorf("%s printed %q, want %q", name, out, want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "PWNED")); !errors.Is(err, os.ErrNotExist) {
		t.Error("an argument was run by the shell")
	}
	// A relative path that starts with '-' is not an option of exec.
	if err := os.Mkdir(filepath.Join(dir, "-x"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(printf, filepath.Join(dir, "-x", "p")); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	cmd, err := Command(context.Background(), "-x/p", []string{"ok"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := cmd.Output(); err != nil || string(out) != "ok" {
		t.Errorf("-x/p: %q, %v", out, err)
	}
}

func TestCommandRefuses(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	files := []*os.File{f}
	for _, c := range []struct {
		name  string
		files []*os.File
		names []string
		want  error
		text  string
	}{
		{"cat", files, []string{"a", "b"}, ErrInvalid, "2 names for 1 files"},
		{"cat", files, []string{"tcp-198.18.0.10:80"}, ErrInvalid, "name 0"},
		{"cat", files, []string{""}, ErrInvalid, "name 0"},
		{"cat", files, []string{strings.Repeat("n", 256)}, ErrInvalid, "name 0"},
		{"cat", files, []string{"with space"}, ErrInvalid, "name 0"},
		{"cat", []*os.File{nil}, nil, ErrInvalid, "file 0 is nil"},
		{"no-such-program-anywhere", nil, nil, exec.ErrNotFound, "find no-such-program-anywhere"},
	} {
		_, err := Command(context.Background(), c.name, nil, c.files, c.names)
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) || !strings.HasPrefix(err.Error(), "activation: ") {
			t.Errorf("Command(%s, %q): %v, want %v saying %q", c.name, c.names, err, c.want, c.text)
		}
	}
}

// TestCommandEnvironment: stale LISTEN_* variables of our own environment
// do not reach the program, and LISTEN_FDNAMES is left out without names.
func TestCommandEnvironment(t *testing.T) {
	t.Setenv(EnvPID, "1")
	t.Setenv(EnvFDs, "9")
	t.Setenv(EnvFDNames, "stale")
	cmd, err := Command(context.Background(), "env", nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, kv := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(kv, "LISTEN_") {
			got = append(got, kv)
		}
	}
	slices.Sort(got)
	want := []string{EnvFDs + "=0", EnvPID + "=" + strconv.Itoa(cmd.Process.Pid)}
	if !slices.Equal(got, want) {
		t.Errorf("program saw %q, want %q", got, want)
	}
}

// TestFilesIgnoresOthersAndRefusesMalformed runs in this process, so it
// never lets Files reach descriptor 3 (which is the test binary's own).
func TestFilesIgnoresOthersAndRefusesMalformed(t *testing.T) {
	self := strconv.Itoa(os.Getpid())
	for _, c := range []struct {
		pid, fds, names string
		setNames        bool
		want            error
	}{
		{pid: "1", fds: "1"},                 // meant for another process
		{pid: self, fds: "x", want: ErrEnv},  // not a count
		{pid: self, fds: "-1", want: ErrEnv}, // negative
		{pid: self, fds: "99999999", want: ErrEnv},
		{pid: self, fds: "1", names: "a:b", setNames: true, want: ErrEnv}, // two names for one descriptor
		{pid: "me", fds: "1", want: ErrEnv},
		{pid: self, fds: "0"},
	} {
		t.Setenv(EnvPID, c.pid)
		t.Setenv(EnvFDs, c.fds)
		os.Unsetenv(EnvFDNames)
		if c.setNames {
			t.Setenv(EnvFDNames, c.names)
		}
		files, err := Files(true)
		if len(files) != 0 || !errors.Is(err, c.want) || (c.want == nil && err != nil) {
			t.Errorf("LISTEN_PID=%s LISTEN_FDS=%s: %d files, %v; want none, %v", c.pid, c.fds, len(files), err, c.want)
		}
		for _, k := range []string{EnvPID, EnvFDs, EnvFDNames} {
			if _, ok := os.LookupEnv(k); ok {
				t.Errorf("Files(true) left %s set", k)
			}
		}
	}
	os.Unsetenv(EnvPID)
	if files, err := Files(false); files != nil || err != nil {
		t.Errorf("without LISTEN_PID: %v, %v", files, err)
	}
}
