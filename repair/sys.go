package repair

import (
	"encoding/binary"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Kernel values that golang.org/x/sys/unix does not define.
const (
	tcpNoQueue   = 0 // TCP_NO_QUEUE: no queue selected
	tcpRecvQueue = 1 // TCP_RECV_QUEUE
	tcpSendQueue = 2 // TCP_SEND_QUEUE

	tcpAOInfo  = 40 // TCP_AO_INFO (6.7+): getsockopt succeeds only when TCP-AO is in use
	tcpIsMPTCP = 43 // TCP_IS_MPTCP

	tcpiOptTimestamps = 1  // TCPI_OPT_TIMESTAMPS
	tcpiOptSACK       = 2  // TCPI_OPT_SACK
	tcpiOptWScale     = 4  // TCPI_OPT_WSCALE
	tcpiOptECN        = 8  // TCPI_OPT_ECN
	tcpiOptUsecTS     = 64 // TCPI_OPT_USEC_TS

	repairWindowSize = 20 // sizeof(struct tcp_repair_window)
)

// The helpers below keep their arguments on the caller's stack: each
// pointer is converted to uintptr inside the call expression, so nothing
// escapes and an idle dump allocates nothing.
//
// Two ways into the kernel. The plain helpers (getsockopt, getInt, setInt,
// ioctlInt, sockname ...) go through unix.Syscall, which tells the Go
// scheduler that the goroutine may block: if the call takes long, its P
// goes to another goroutine, and a stop-the-world does not wait for it.
// The helpers named ...Raw go through unix.RawSyscall, which skips that
// bookkeeping, which was 10-17 % of the CPU of a restore and of a capture
// (a few dozen such calls each) in a perf profile at 10,000 connections
// (docs/repair.md, "Decisions"). The price: for as long as a raw call lasts, its
// goroutine cannot be preempted and keeps its P. If it sleeps in the
// kernel, a stop-the-world that begins meanwhile (every garbage collection
// has two) waits for it with all the other goroutines already stopped:
// the whole program stalls, not just that P.
//
// A socket call sleeps when it needs the socket lock (lock_sock or
// lock_sock_fast: most option calls, the queue ioctls, the peek, and
// getsockname and getpeername through inet_getname) while another task
// owns it, or when a page fault on the user buffer has to find memory. So
// the raw helpers serve only sockets no other task can hold, with small
// buffers: the source's sockets once their owner is frozen or paused
// (Precapture, before the lock but after the pause; Unchanged, Capture,
// Recapture, Resume, Discard), and this process's own sockets (NewBlank,
// Restorer.Preset, Restore, Settle, Restorer.Resume or Wake and Finish,
// Discard on the target, and the binds of Listen and PortHeld), for option
// calls and ioctls on a few bytes of stack, bind, and peeks of at most
// maxRawPeek bytes. Everything on a socket someone else may still use
// (Inspect, Announce and Drain, which run before the lock,
// DescribeListener, the sock_diag cookie lookups) takes the plain path, as
// do larger peeks, connect, send, and the string options SO_BINDTODEVICE
// and TCP_CONGESTION (unix.SetsockoptString; the latter may load a
// module).

// maxRawPeek is the largest queue peek made with a raw call: copying more
// takes long, and the fresh pages of a large buffer fault on first touch.
const maxRawPeek = 64 << 10

func getsockoptRaw(fd, level, opt int, p unsafe.Pointer, n uint32) (uint32, error) {
	l := n
	_, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return 0, e
	}
	return l, nil
}

func setsockoptRaw(fd, level, opt int, p unsafe.Pointer, n uint32) error {
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(n), 0)
	if e != 0 {
		return e
	}
	return nil
}

func getsockopt(fd, level, opt int, p unsafe.Pointer, n uint32) (uint32, error) {
	l := n
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return 0, e
	}
	return l, nil
}

func setsockopt(fd, level, opt int, p unsafe.Pointer, n uint32) error {
	_, _, e := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(n), 0)
	if e != 0 {
		return e
	}
	return nil
}

func getIntRaw(fd, level, opt int) (int32, error) {
	var v int32
	_, err := getsockoptRaw(fd, level, opt, unsafe.Pointer(&v), 4)
	return v, err
}

func setIntRaw(fd, level, opt int, v int32) error {
	return setsockoptRaw(fd, level, opt, unsafe.Pointer(&v), 4)
}

func getInt(fd, level, opt int) (int32, error) {
	var v int32
	_, err := getsockopt(fd, level, opt, unsafe.Pointer(&v), 4)
	return v, err
}

func setInt(fd, level, opt int, v int32) error {
	return setsockopt(fd, level, opt, unsafe.Pointer(&v), 4)
}

func ioctlIntRaw(fd int, req uint) (int32, error) {
	var v int32
	_, _, e := unix.RawSyscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&v)))
	if e != 0 {
		return 0, e
	}
	return v, nil
}

func ioctlInt(fd int, req uint) (int32, error) {
	var v int32
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&v)))
	if e != 0 {
		return 0, e
	}
	return v, nil
}

func getWindow(fd int, w *Window) error {
	_, err := getsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, unsafe.Pointer(w), repairWindowSize)
	return err
}

func setWindow(fd int, w *Window) error {
	return setsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, unsafe.Pointer(w), repairWindowSize)
}

// peek copies up to len(buf) bytes of the selected queue of fd, a socket
// no other task holds, without consuming them: with a raw call up to
// maxRawPeek bytes, through the scheduler above.
func peek(fd int, buf []byte) (int, error) {
	var p unsafe.Pointer
	var one byte
	if len(buf) > 0 {
		p = unsafe.Pointer(&buf[0])
	} else {
		p = unsafe.Pointer(&one)
	}
	call := unix.RawSyscall6
	if len(buf) > maxRawPeek {
		call = unix.Syscall6
	}
	for {
		n, _, e := call(unix.SYS_RECVFROM, uintptr(fd), uintptr(p), uintptr(len(buf)), unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e == unix.EAGAIN {
			return 0, nil
		}
		if e != 0 {
			return 0, e
		}
		return int(n), nil
	}
}

// send writes buf with one send(2) call and returns how much went in.
func send(fd int, buf []byte) (int, error) {
	for {
		n, _, e := unix.Syscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return int(n), e
		}
		return int(n), nil
	}
}

// sockname reads the local (peer=false) or remote address of fd.
func sockname(fd int, peer bool) (netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	l := uint32(unsafe.Sizeof(rsa))
	trap := uintptr(unix.SYS_GETSOCKNAME)
	if peer {
		trap = unix.SYS_GETPEERNAME
	}
	_, _, e := unix.Syscall(trap, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&l)))
	if e != 0 {
		return netip.AddrPort{}, e
	}
	return fromRaw(&rsa)
}

// peername reads the remote address of fd. getpeername refuses it in
// SYN_SENT and CLOSE; SO_PEERNAME still answers there while the socket
// keeps its peer.
func peername(fd int, family uint16) (netip.AddrPort, error) {
	ap, err := sockname(fd, true)
	if err != unix.ENOTCONN {
		return ap, err
	}
	var rsa unix.RawSockaddrAny
	// The kernel insists on a buffer no longer than the address.
	n := uint32(unix.SizeofSockaddrInet4)
	if family == unix.AF_INET6 {
		n = unix.SizeofSockaddrInet6
	}
	if _, err := getsockopt(fd, unix.SOL_SOCKET, unix.SO_PEERNAME, unsafe.Pointer(&rsa), n); err != nil {
		return netip.AddrPort{}, err
	}
	return fromRaw(&rsa)
}

func fromRaw(rsa *unix.RawSockaddrAny) (netip.AddrPort, error) {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port), nil
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		a := netip.AddrFrom16(sa.Addr)
		if sa.Scope_id != 0 {
			a = a.WithZone(itoa(int(sa.Scope_id)))
		}
		return netip.AddrPortFrom(a, port), nil
	}
	return netip.AddrPort{}, unix.EAFNOSUPPORT
}

// toRaw builds the sockaddr for family from ap; an IPv4 address on an
// AF_INET6 socket is written as IPv4-mapped.
func toRaw(family uint16, ap netip.AddrPort, rsa *unix.RawSockaddrAny) (uint32, error) {
	a := ap.Addr()
	switch family {
	case unix.AF_INET:
		if !a.Unmap().Is4() {
			return 0, unix.EAFNOSUPPORT
		}
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		sa.Family = unix.AF_INET
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], ap.Port())
		sa.Addr = a.Unmap().As4()
		return unix.SizeofSockaddrInet4, nil
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		sa.Family = unix.AF_INET6
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], ap.Port())
		sa.Addr = a.As16()
		if z := a.Zone(); z != "" {
			if ifi, err := interfaceIndex(z); err == nil {
				sa.Scope_id = ifi
			}
		}
		return unix.SizeofSockaddrInet6, nil
	}
	return 0, unix.EAFNOSUPPORT
}

// bindRaw binds fd, a socket of this process's own, to ap with a raw call.
func bindRaw(fd int, family uint16, ap netip.AddrPort) error {
	var rsa unix.RawSockaddrAny
	l, err := toRaw(family, ap, &rsa)
	if err != nil {
		return err
	}
	_, _, e := unix.RawSyscall(unix.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(l))
	if e != 0 {
		return e
	}
	return nil
}

// connectTo connects fd to ap; EINPROGRESS is success.
func connectTo(fd int, family uint16, ap netip.AddrPort) error {
	var rsa unix.RawSockaddrAny
	l, err := toRaw(family, ap, &rsa)
	if err != nil {
		return err
	}
	_, _, e := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(l))
	if e != 0 && e != unix.EINPROGRESS {
		return e
	}
	return nil
}
