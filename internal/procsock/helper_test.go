package procsock_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// helperEnv makes the test binary act as the socket-holding program of the
// tests instead of running them.
const helperEnv = "PROCSOCK_TEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		os.Exit(helperMain(os.Args[1:]))
	}
	// Every goroutine a test starts (acceptors, pipe readers, reapers) ends
	// with the test's cleanups, and InNetNS leaves none behind.
	goleak.VerifyTestMain(m)
}

// helperMain is a plain program that opens sockets as its arguments say and
// then waits for its stdin to close. For each argument it prints one line
// "KIND FD LOCAL REMOTE":
//
//	listen=ADDR  listen on ADDR; accept one connection and close it at once
//	dial=ADDR    connect to ADDR
//	shut=ADDR    connect to ADDR and shut down the sending side (FIN_WAIT2)
//	dup          duplicate the previous descriptor (two fds, one socket)
func helperMain(args []string) int {
	var keep []any // descriptors must not be closed by finalizers
	prev := -1
	for _, a := range args {
		kind, addr, _ := strings.Cut(a, "=")
		var fd int
		var local, remote string
		switch kind {
		case "listen":
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			keep = append(keep, ln)
			fd = rawFD(ln.(*net.TCPListener))
			local, remote = ln.Addr().String(), "-"
			go func() {
				if c, err := ln.Accept(); err == nil {
					c.Close()
				}
			}()
		case "dial", "shut":
			c, err := net.Dial("tcp", addr)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			keep = append(keep, c)
			if kind == "shut" {
				c.(*net.TCPConn).CloseWrite()
			}
			fd = rawFD(c.(*net.TCPConn))
			local, remote = c.LocalAddr().String(), c.RemoteAddr().String()
		case "dup":
			var err error
			if fd, err = unix.Dup(prev); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			local, remote = "-", "-"
		default:
			fmt.Fprintln(os.Stderr, "unknown helper action", a)
			return 2
		}
		prev = fd
		fmt.Printf("%s %d %s %s\n", kind, fd, local, remote)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	_ = keep
	return 0
}

func rawFD(c syscall.Conn) int {
	rc, err := c.SyscallConn()
	if err != nil {
		panic(err)
	}
	fd := -1
	rc.Control(func(f uintptr) { fd = int(f) })
	return fd
}

// helperLine is one line the helper printed about a socket it opened.
type helperLine struct {
	kind          string
	fd            int
	local, remote string
}

// helper is a running helper process.
type helper struct {
	cmd   *exec.Cmd
	pid   int
	lines []helperLine
}

// startHelper runs the helper inside ns and waits until it has opened its
// sockets. The process is killed and reaped when the test ends.
func startHelper(t *testing.T, ns *lab.NS, args ...string) *helper {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := ns.Command(exe, args...)
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	h := &helper{cmd: cmd, pid: cmd.Process.Pid}
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("helper exited before it was ready")
			}
			if l == "ready" {
				go func() {
					for range lines {
					}
				}()
				checkExe(t, h.pid, exe)
				return h
			}
			var hl helperLine
			if _, err := fmt.Sscan(l, &hl.kind, &hl.fd, &hl.local, &hl.remote); err != nil {
				t.Fatalf("helper said %q: %v", l, err)
			}
			h.lines = append(h.lines, hl)
		case <-deadline:
			t.Fatalf("helper not ready after 10s")
		}
	}
}

// checkExe makes sure pid is the helper itself and not the "ip netns exec"
// that started it.
func checkExe(t *testing.T, pid int, exe string) {
	t.Helper()
	got, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		t.Fatal(err)
	}
	if got != exe {
		t.Fatalf("pid %d runs %s, want the helper %s", pid, got, exe)
	}
}
