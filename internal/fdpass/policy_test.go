package fdpass

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

const nobody = 65534

// childResult is what a dialing child process reports on stdout.
type childResult struct {
	UID     int
	OK      bool
	Refused bool // errors.Is(err, ErrRefused)
	EACCES  bool // errors.Is(err, EACCES): the file mode kept it out
	Err     string
}

// childMain runs in a child process started by the tests.
func childMain(mode string) int {
	if mode != "dial" {
		return 2
	}
	res := childResult{UID: os.Getuid()}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, os.Getenv("FDPASS_TEST_PATH"), Limits{})
	if err == nil {
		// Prove the connection works both ways: an empty message and its ack.
		err = c.SendSockets(nil)
		if err == nil {
			_, err = c.RecvAck()
		}
		c.Close()
	}
	res.OK = err == nil
	if err != nil {
		res.Err = err.Error()
		res.Refused = errors.Is(err, ErrRefused)
		res.EACCES = errors.Is(err, syscall.EACCES)
	}
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

// TestPolicyChecksPeerCredentials runs a copy of the test binary as the
// nobody user (SysProcAttr.Credential) against listeners with different
// policies.
func TestPolicyChecksPeerCredentials(t *testing.T) {
	lab.Require(t) // setting another process's credentials needs root
	dir, err := os.MkdirTemp("", "fdpass-policy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil { // nobody must reach the socket and the binary
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "fdpass.test")
	copyFile(t, bin)

	runChild := func(t *testing.T, path string) (childResult, int) {
		t.Helper()
		cmd := exec.Command(bin)
		cmd.Env = append(os.Environ(), childEnv+"=dial", "FDPASS_TEST_PATH="+path)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		var out strings.Builder
		cmd.Stdout = &out
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("child: %v", err)
		}
		var r childResult
		if err := json.Unmarshal([]byte(out.String()), &r); err != nil {
			t.Fatalf("child output %q: %v", out.String(), err)
		}
		if r.UID != nobody {
			t.Fatalf("child ran as uid %d", r.UID)
		}
		return r, cmd.Process.Pid
	}
	serve := func(ln *Listener) chan error {
		done := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			if c.Peer().UID != nobody {
				done <- errors.New("accepted peer is not nobody")
				return
			}
			items, err := c.RecvSockets()
			if err == nil && len(items) != 0 {
				err = errors.New("expected an empty message")
			}
			if err == nil {
				err = c.SendAck(nil)
			}
			done <- err
		}()
		return done
	}

	t.Run("file mode keeps others out", func(t *testing.T) {
		ln, err := Listen(filepath.Join(dir, "default.sock"), Policy{})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		r, _ := runChild(t, ln.Path())
		if r.OK || !r.EACCES {
			t.Fatalf("nobody against a 0600 socket: %+v, want EACCES", r)
		}
	})

	t.Run("credentials refused", func(t *testing.T) {
		ln, err := Listen(filepath.Join(dir, "open.sock"), Policy{Mode: 0o666})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		done := make(chan error, 1)
		go func() {
			_, err := ln.Accept()
			done <- err
		}()
		r, pid := runChild(t, ln.Path())
		aerr := <-done
		if r.OK || !r.Refused || !strings.Contains(r.Err, "uid 65534") {
			t.Errorf("child: %+v, want a refusal naming uid 65534", r)
		}
		var pe *PeerError
		if !errors.Is(aerr, ErrRefused) || !errors.As(aerr, &pe) || pe.Cred.UID != nobody || pe.Cred.PID != int32(pid) {
			t.Errorf("accept: %v, want a PeerError for uid %d pid %d", aerr, nobody, pid)
		}
		t.Logf("listener: %v; child: %s", aerr, r.Err)
		// The listener goes on after a refusal.
		app, agent := connect(t, ln, Limits{})
		if err := app.SendAck([]uint64{1}); err != nil {
			t.Fatal(err)
		}
		if _, err := agent.Receive(); err != nil {
			t.Fatal(err)
		}
	})

	for _, c := range []struct {
		name string
		p    Policy
	}{
		{"allowed by UID", Policy{Mode: 0o666, UIDs: []uint32{nobody}}},
		{"allowed by GID", Policy{Mode: 0o666, GIDs: []uint32{nobody}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ln, err := Listen(filepath.Join(dir, "allowed.sock"), c.p)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			done := serve(ln)
			r, _ := runChild(t, ln.Path())
			if err := <-done; err != nil {
				t.Errorf("listener: %v", err)
			}
			if !r.OK {
				t.Errorf("child: %+v", r)
			}
		})
	}

	t.Run("root always allowed", func(t *testing.T) {
		ln := listenTemp(t, Policy{UIDs: []uint32{12345}})
		connect(t, ln, Limits{})
	})
}

func copyFile(t *testing.T, dst string) {
	t.Helper()
	src, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestListenFileSafety checks the socket file's mode and group, the
// directory check, and the handling of files already at the path.
func TestListenFileSafety(t *testing.T) {
	dir := t.TempDir()
	stat := func(path string) (fs.FileMode, *syscall.Stat_t) {
		t.Helper()
		fi, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Mode(), fi.Sys().(*syscall.Stat_t)
	}

	a, err := Listen(filepath.Join(dir, "a.sock"), Policy{})
	if err != nil {
		t.Fatal(err)
	}
	if m, st := stat(a.Path()); m.Type() != fs.ModeSocket || m.Perm() != 0o600 || int(st.Uid) != os.Geteuid() {
		t.Errorf("default socket file: mode %v uid %d, want a 0600 socket of uid %d", m, st.Uid, os.Geteuid())
	}
	// Wider than the umask (022) allows: the final chmod sets it exactly.
	b, err := Listen(filepath.Join(dir, "b.sock"), Policy{Mode: 0o666})
	if err != nil {
		t.Fatal(err)
	}
	if m, _ := stat(b.Path()); m.Perm() != 0o666 {
		t.Errorf("Mode 0666 socket file: %v", m)
	}
	b.Close()
	if _, err := os.Lstat(b.Path()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Close left the socket file: %v", err)
	}
	if os.Geteuid() == 0 {
		g, err := Listen(filepath.Join(dir, "g.sock"), Policy{Mode: 0o660, Group: "nogroup"})
		if err != nil {
			t.Fatal(err)
		}
		if m, st := stat(g.Path()); m.Perm() != 0o660 || st.Gid != nobody {
			t.Errorf("group socket file: mode %v gid %d, want 0660 gid %d", m, st.Gid, nobody)
		}
		g.Close()
	}

	// The file at the path listens from the moment it exists (it was
	// bound under a temporary name, which is gone): a connect succeeds.
	c, err := net.Dial("unix", a.Path())
	if err != nil {
		t.Errorf("connect to a socket file Listen returned: %v", err)
	} else {
		c.Close()
	}
	if ents, err := os.ReadDir(dir); err != nil {
		t.Fatal(err)
	} else if len(ents) != 1 || ents[0].Name() != "a.sock" {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("directory holds %v, want only a.sock (b.sock closed, no temporary name left)", names)
	}

	// A live socket is not taken over.
	if _, err := Listen(a.Path(), Policy{}); !errors.Is(err, unix.EADDRINUSE) {
		t.Errorf("listen on a live socket: %v, want EADDRINUSE", err)
	}
	a.Close()

	// A stale one is.
	stale := filepath.Join(dir, "stale.sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: stale}); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	if s, err := Listen(stale, Policy{}); err != nil {
		t.Errorf("listen over a stale socket file: %v", err)
	} else {
		s.Close()
	}

	regular := filepath.Join(dir, "regular")
	if err := os.WriteFile(regular, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	open := filepath.Join(dir, "open")
	sticky := filepath.Join(dir, "sticky")
	for d, m := range map[string]fs.FileMode{open: 0o777, sticky: 0o777 | fs.ModeSticky} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, m); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		path string
		p    Policy
		text string
	}{
		{regular, Policy{}, "not a socket"},
		{filepath.Join(open, "x.sock"), Policy{}, "writable by group or others"},
		{"@abstract", Policy{}, "abstract"},
		{filepath.Join(dir, "m.sock"), Policy{Mode: fs.ModeSetuid | 0o600}, "bits other than permissions"},
		{filepath.Join(dir, "n.sock"), Policy{Group: "no-such-group-here"}, "no-such-group-here"},
		{filepath.Join(dir, "missing", "x.sock"), Policy{}, "no such file"},
	} {
		l, err := Listen(c.path, c.p)
		if err == nil {
			l.Close()
			t.Errorf("listen %s: accepted", c.path)
			continue
		}
		if !strings.Contains(err.Error(), c.text) || !strings.HasPrefix(err.Error(), "fdpass: listen ") {
			t.Errorf("listen %s: %v, want it to say %q", c.path, err, c.text)
		}
	}
	if b, _ := os.ReadFile(regular); string(b) != "keep me" {
		t.Error("Listen touched a regular file")
	}
	if s, err := Listen(filepath.Join(sticky, "x.sock"), Policy{}); err != nil {
		t.Errorf("listen in a sticky directory: %v", err)
	} else {
		s.Close()
	}
}
