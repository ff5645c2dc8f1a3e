package procsock

import (
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/nsdo"
)

// NetNS opens the network namespace of process pid (/proc/PID/ns/net). The
// caller closes the handle. repair.Inspect and repair.Dump must run in the
// namespace of the socket, which is the one the process was in when it
// created the socket: for every ordinary program, the process's own.
func NetNS(pid int) (netns.NsHandle, error) {
	h, err := netns.GetFromPid(pid)
	if err != nil {
		return netns.None(), opErr("open network namespace", pid, -1, err)
	}
	return h, nil
}

// InNetNS runs fn on an OS thread inside the network namespace of process
// pid and returns fn's error. fn runs on a goroutine of its own, locked to
// its thread; sockets it creates belong to that namespace for their life.
// If the thread cannot return to the caller's namespace it is terminated
// with the goroutine, so no later goroutine runs in the wrong namespace.
func InNetNS(pid int, fn func() error) error {
	h, err := NetNS(pid)
	if err != nil {
		return err
	}
	defer h.Close()
	return nsdo.Do(int(h), fn)
}

// diagSocket opens a NETLINK_SOCK_DIAG socket in the network namespace of
// process pid. A netlink socket answers for the namespace it was created
// in, so only its creation needs the namespace switch.
func diagSocket(pid int) (int, error) {
	nl := -1
	err := InNetNS(pid, func() error {
		var err error
		nl, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
		if err != nil {
			return opErr("socket NETLINK_SOCK_DIAG", pid, -1, err)
		}
		return nil
	})
	if err != nil && nl >= 0 {
		unix.Close(nl)
		return -1, err
	}
	return nl, err
}
