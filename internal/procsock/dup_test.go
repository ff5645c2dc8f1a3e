package procsock_test

import (
	"errors"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"unsafe"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/procsock"
)

// held counts this process's descriptors that are copies of the helper's
// sockets (by inode), plus its pidfds (os/exec keeps one per child, so the
// callers compare with a count taken before). Other descriptors come and go
// with the runtime and the test's own sockets, so they are not counted.
func held(t *testing.T, socks []procsock.Socket) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		link, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue
		}
		if link == "anon_inode:[pidfd]" {
			n++
		}
		for _, s := range socks {
			if link == "socket:["+strconv.FormatUint(s.Inode, 10)+"]" {
				n++
			}
		}
	}
	return n
}

func cookie(t *testing.T, f *os.File) uint64 {
	t.Helper()
	var c uint64
	l := uint32(8)
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	rc.Control(func(fd uintptr) {
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_COOKIE,
			uintptr(unsafe.Pointer(&c)), uintptr(unsafe.Pointer(&l)), 0)
		if e != 0 {
			serr = e
		}
	})
	if serr != nil {
		t.Fatal(serr)
	}
	return c
}

func TestDup(t *testing.T) {
	w := newWorld(t)
	h := startHelper(t, w.app,
		"dial="+w.srv4.String(),
		"dup",
		"dial="+w.srv6.String(),
		"listen="+netip.AddrPortFrom(appV6, 0).String(),
	)
	socks, err := procsock.List(h.pid)
	if err != nil {
		t.Fatal(err)
	}
	taken := procsock.Taken(socks)
	if len(taken) != 2 {
		t.Fatalf("%d sockets taken, want 2:%s", len(taken), dumpList(socks))
	}
	// List orders by lowest descriptor, and a dup may take a lower number
	// than the second dial's: put the duplicated connection first.
	if len(taken[0].FDs) == 1 {
		taken[0], taken[1] = taken[1], taken[0]
	}
	if len(taken[0].FDs) != 2 || len(taken[1].FDs) != 1 {
		t.Fatalf("want one socket with two descriptors and one with one:%s", dumpList(socks))
	}

	t.Run("SameSockets", func(t *testing.T) {
		base := held(t, socks)
		fds := []int{taken[0].FDs[0], taken[0].FDs[1], taken[1].FDs[0]}
		files, err := procsock.Dup(h.pid, fds)
		if err != nil {
			t.Fatal(err)
		}
		if n := held(t, socks) - base; n != 3 {
			t.Errorf("%d copies held after Dup of 3 descriptors (or a pidfd left open)", n)
		}
		for i, f := range files {
			s := taken[0]
			if i == 2 {
				s = taken[1]
			}
			if c := cookie(t, f); c != s.Cookie {
				t.Errorf("copy of fd %d has SO_COOKIE %d, sock_diag said %d", fds[i], c, s.Cookie)
			}
			if l, r, err := lab.SockAddrs(f); err != nil {
				t.Fatal(err)
			} else if l != s.Local || r != s.Remote {
				t.Errorf("copy of fd %d is %s->%s, want %s->%s", fds[i], l, r, s.Local, s.Remote)
			}
			f.Close()
		}
		if n := held(t, socks) - base; n != 0 {
			t.Errorf("%d copies held after closing them all", n)
		}

		files, err = procsock.DupSockets(h.pid, taken)
		if err != nil {
			t.Fatal(err)
		}
		for i, f := range files {
			if c := cookie(t, f); c != taken[i].Cookie {
				t.Errorf("DupSockets copy %d has SO_COOKIE %d, want %d", i, c, taken[i].Cookie)
			}
			f.Close()
		}
	})

	t.Run("Failures", func(t *testing.T) {
		base := held(t, socks)
		check := func(name string, files []*os.File, err error, want error, fd int) {
			t.Helper()
			var pe *procsock.Error
			if files != nil || !errors.Is(err, want) || !errors.As(err, &pe) || pe.PID != h.pid || pe.FD != fd {
				t.Errorf("%s: files %v, error %v; want %v naming pid %d fd %d", name, files, err, want, h.pid, fd)
			}
			if n := held(t, socks) - base; n != 0 {
				t.Errorf("%s: %d copies or pidfds left open", name, n)
			}
		}
		files, err := procsock.Dup(h.pid, []int{taken[0].FD(), taken[1].FD(), 999})
		check("Dup of a closed descriptor", files, err, unix.EBADF, 999)

		changed := append([]procsock.Socket(nil), taken...)
		changed[1].Inode++
		files, err = procsock.DupSockets(h.pid, changed)
		check("DupSockets of a reused descriptor", files, err, procsock.ErrChanged, taken[1].FD())

		changed = append([]procsock.Socket(nil), taken...)
		changed[0].FDs = []int{0} // the helper's stdin, a pipe
		files, err = procsock.DupSockets(h.pid, changed)
		check("DupSockets of a pipe", files, err, procsock.ErrNotSocket, 0)

		changed[0].FDs = nil
		files, err = procsock.DupSockets(h.pid, changed)
		check("DupSockets of a socket without descriptor", files, err, procsock.ErrNoDescriptor, -1)
	})

	t.Run("NoProcess", func(t *testing.T) {
		_, err := procsock.Dup(1<<30, []int{0})
		if !errors.Is(err, unix.ESRCH) {
			t.Errorf("Dup of a missing process: %v, want ESRCH", err)
		}
	})
}

func TestNetNS(t *testing.T) {
	w := newWorld(t)
	h := startHelper(t, w.app, "dial="+w.srv4.String())
	ns, err := procsock.NetNS(h.pid)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if !ns.Equal(netns.NsHandle(w.app.Handle())) || ns.Equal(netns.NsHandle(w.peer.Handle())) {
		t.Errorf("NetNS(%d) is not the app namespace", h.pid)
	}
	var inside netns.NsHandle
	err = procsock.InNetNS(h.pid, func() (err error) {
		inside, err = netns.Get()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer inside.Close()
	if !inside.Equal(ns) {
		t.Errorf("InNetNS ran fn outside the process's namespace")
	}
	self, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	if self.Equal(ns) {
		t.Errorf("the test goroutine's thread was left in the app namespace")
	}
}
