package firewall

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// dupNetNS returns a descriptor of the namespace fd refers to, owned by the
// caller: a duplicate of fd, or for 0 the calling thread's namespace.
func dupNetNS(fd int) (int, error) {
	if fd == 0 {
		nfd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return -1, os.NewSyscallError("open /proc/thread-self/ns/net", err)
		}
		return nfd, nil
	}
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, os.NewSyscallError(fmt.Sprintf("dup netns descriptor %d", fd), err)
	}
	return nfd, nil
}

// inNetNS runs fn on a fresh OS thread that has entered the namespace nsfd.
// Sockets fn creates belong to that namespace for their whole life. The
// thread is thrown away afterwards unless it got back to its namespace.
func inNetNS(nsfd int, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- os.NewSyscallError("open /proc/thread-self/ns/net", err)
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(nsfd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- os.NewSyscallError("setns", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it dies with this goroutine.
			errc <- os.NewSyscallError("setns back", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// claimOwner binds the abstract unix socket that marks name as held by a
// live process, in the calling thread's namespace (abstract socket names
// are per network namespace). It fails with ErrExists if the name is bound.
func claimOwner(name string) (int, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, os.NewSyscallError("socket", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: "@" + name}); err != nil {
		unix.Close(fd)
		if err == unix.EADDRINUSE {
			return -1, ErrExists
		}
		return -1, os.NewSyscallError("bind @"+name, err)
	}
	return fd, nil
}
