package fdpass

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// childEnv makes the test binary act as a child process (see childMain)
// instead of running tests.
const childEnv = "FDPASS_TEST_CHILD"

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		os.Exit(childMain(mode))
	}
	goleak.VerifyTestMain(m)
}

// The addresses the test namespace puts on its loopback.
var (
	srv4 = netip.MustParseAddr("198.18.0.10")
	cli4 = netip.MustParseAddr("198.18.0.1")
	srv6 = netip.MustParseAddr("fd00::10")
	cli6 = netip.MustParseAddr("fd00::1")
)

// newHost returns a fresh network namespace whose loopback carries the test
// addresses; no test traffic touches the root namespace.
func newHost(t *testing.T) *lab.NS {
	t.Helper()
	return lab.NewTestNS(t, "fdpass", srv4, cli4, srv6, cli6)
}

// pair is an established TCP connection: peer stays in the test as the far
// end, served is the end that gets passed around.
type pair struct {
	peer   *net.TCPConn
	served *net.TCPConn
}

// makePairs opens n connections from cli to a listener on srv inside ns.
// srv may be the IPv6 unspecified address, to get IPv4-mapped sockets.
func makePairs(t *testing.T, ns *lab.NS, n int, srv, cli netip.Addr) []pair {
	t.Helper()
	pairs := make([]pair, 0, n)
	t.Cleanup(func() {
		for _, p := range pairs {
			p.peer.Close()
			p.served.Close()
		}
	})
	err := ns.Do(func() error {
		ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(srv, 0)))
		if err != nil {
			return err
		}
		defer ln.Close()
		dst := netip.AddrPortFrom(srv, ln.Addr().(*net.TCPAddr).AddrPort().Port())
		if srv.IsUnspecified() {
			dst = netip.AddrPortFrom(srv4, dst.Port())
		}
		for i := 0; i < n; i++ {
			c, err := net.DialTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(cli, 0)), net.TCPAddrFromAddrPort(dst))
			if err != nil {
				return err
			}
			s, err := ln.AcceptTCP()
			if err != nil {
				c.Close()
				return err
			}
			pairs = append(pairs, pair{peer: c, served: s})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return pairs
}

// item turns the served end of a pair into an Item; the pair's net.Conn is
// closed, so the Item's file is the test's only descriptor of it.
func item(t *testing.T, p pair, id uint64, state []byte) Item {
	t.Helper()
	f, err := p.served.File()
	if err != nil {
		t.Fatal(err)
	}
	l, r := sockAddrs(t, f)
	p.served.Close()
	return Item{File: f, Local: l, Remote: r, State: state, ID: id}
}

// sockAddrs asks the kernel for a socket's addresses.
func sockAddrs(t *testing.T, f *os.File) (local, remote netip.AddrPort) {
	t.Helper()
	l, r, err := lab.SockAddrs(f)
	if err != nil {
		t.Fatal(err)
	}
	return l, r
}

// exchange proves that f is the socket whose far end is peer: a message
// written through f arrives at peer, and one written by peer arrives
// through f.
func exchange(t *testing.T, f *os.File, peer *net.TCPConn, who string) {
	t.Helper()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline := time.Now().Add(5 * time.Second)
	c.SetDeadline(deadline)
	peer.SetDeadline(deadline)
	out := []byte("from " + who + " via " + f.Name())
	if _, err := c.Write(out); err != nil {
		t.Fatal(err)
	}
	in := make([]byte, len(out))
	if _, err := io.ReadFull(peer, in); err != nil || !bytes.Equal(in, out) {
		t.Fatalf("peer read %q, %v; want %q", in, err, out)
	}
	back := []byte("back to " + who)
	if _, err := peer.Write(back); err != nil {
		t.Fatal(err)
	}
	in = make([]byte, len(back))
	if _, err := io.ReadFull(c, in); err != nil || !bytes.Equal(in, back) {
		t.Fatalf("%s read %q, %v; want %q", who, in, err, back)
	}
}

// expectFIN waits for the peer to see the end of the stream: proof that no
// descriptor of the other end is left open anywhere.
func expectFIN(t *testing.T, peer *net.TCPConn) {
	t.Helper()
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := peer.Read(make([]byte, 1))
	if n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("peer read %d bytes, %v; want EOF (a descriptor of the served end leaked)", n, err)
	}
}

// countFDs returns how many descriptors the process has open.
func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// listenTemp listens in a fresh private directory.
func listenTemp(t *testing.T, p Policy) *Listener {
	t.Helper()
	ln, err := Listen(t.TempDir()+"/handoff.sock", p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// connect dials ln and returns both ends.
func connect(t *testing.T, ln *Listener, lim Limits) (dialer, acceptor *Conn) {
	t.Helper()
	type res struct {
		c   *Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d, err := Dial(ctx, ln.Path(), lim)
	a := <-ch
	if err != nil || a.err != nil {
		t.Fatalf("dial: %v; accept: %v", err, a.err)
	}
	t.Cleanup(func() {
		d.Close()
		a.c.Close()
	})
	return d, a.c
}

// isCloexec reports whether f's descriptor is close-on-exec.
func isCloexec(t *testing.T, f *os.File) bool {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var flags int
	var ferr error
	rc.Control(func(fd uintptr) { flags, ferr = unix.FcntlInt(fd, unix.F_GETFD, 0) })
	if ferr != nil {
		t.Fatal(ferr)
	}
	return flags&unix.FD_CLOEXEC != 0
}
