package repair

import (
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Probe reports what the running kernel, in the calling thread's network
// namespace and with the caller's privileges, offers for migration
// (REPAIR-NOTES 8.1). It opens and closes a few throwaway sockets; the
// half-closed probe needs the loopback interface up and is skipped (the
// feature reported absent) when it is not. Probe fails only if it cannot
// create a TCP socket at all.
func Probe() (Capabilities, error) {
	var c Capabilities
	var u unix.Utsname
	if err := unix.Uname(&u); err == nil {
		c.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_available_congestion_control"); err == nil {
		c.Congestion = strings.Fields(string(b))
	}
	if kernelUsecTS() {
		c.Features |= FeatUsecTS
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return c, &OpError{Op: "probe: socket", Err: err}
	}
	defer unix.Close(fd)
	if _, err := getInt(fd, unix.SOL_SOCKET, unix.SO_BUF_LOCK); err == nil {
		c.Features |= FeatBufLock
	}
	if setInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON) == nil {
		c.Features |= FeatRepair
		var w Window
		if getWindow(fd, &w) == nil {
			c.Features |= FeatRepairWindow
		}
		if _, err := getInt(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP); err == nil {
			c.Features |= FeatTimestamp
		}
		if setInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP) == nil {
			c.Features |= FeatRepairOffNoWP
		}
		if probeHalfClosed() {
			c.Features |= FeatHalfClosed
		}
	}
	if raw, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW); err == nil {
		c.Features |= FeatRawInject
		if setInt(raw, unix.SOL_SOCKET, unix.SO_MARK, 1) == nil {
			c.Features |= FeatMark
		}
		unix.Close(raw)
	}
	if c.Features.Has(FeatRepairOffNoWP | FeatRawInject | FeatMark) {
		c.Features |= FeatHeldRestore
	}
	return c, nil
}

// probeHalfClosed connects over loopback, shuts the client's write side and
// tries to put it in repair mode (CRIU's tcp_half_closed check).
func probeHalfClosed() bool {
	ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return false
	}
	defer unix.Close(ln)
	lo := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	if unix.Bind(ln, lo) != nil || unix.Listen(ln, 1) != nil {
		return false
	}
	sa, err := unix.Getsockname(ln)
	if err != nil {
		return false
	}
	cl, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return false
	}
	ok := false
	defer func() {
		if ok {
			_ = Discard(cl)
		} else {
			unix.Close(cl)
		}
	}()
	if unix.Connect(cl, sa) != nil || unix.Shutdown(cl, unix.SHUT_WR) != nil {
		return false
	}
	err = setInt(cl, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON)
	ok = err == nil
	return ok
}
