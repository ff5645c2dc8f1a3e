package lab

import (
	"net/netip"
	"os"

	"golang.org/x/sys/unix"
)

// SockAddrs asks the kernel for the local and remote addresses of the
// socket f (getsockname, getpeername), spelled as the socket's family
// spells them: an IPv4-mapped address on an AF_INET6 socket stays mapped.
func SockAddrs(f *os.File) (local, remote netip.AddrPort, err error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return local, remote, err
	}
	var lsa, rsa unix.Sockaddr
	var lerr, rerr error
	if err := rc.Control(func(fd uintptr) {
		lsa, lerr = unix.Getsockname(int(fd))
		rsa, rerr = unix.Getpeername(int(fd))
	}); err != nil {
		return local, remote, err
	}
	if lerr != nil {
		return local, remote, os.NewSyscallError("getsockname", lerr)
	}
	if rerr != nil {
		return local, remote, os.NewSyscallError("getpeername", rerr)
	}
	return AddrPort(lsa), AddrPort(rsa), nil
}

// AddrPort converts an IPv4 or IPv6 socket address; any other is the zero
// AddrPort.
func AddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}
