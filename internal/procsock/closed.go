package procsock

import (
	"errors"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// closedConns finds the closed TCP connections among the process's socket
// descriptors that sock_diag did not report: a connection in CLOSE (both
// FINs exchanged, or reset) is out of the kernel's lookup tables, so no
// dump lists it, yet its descriptor may still hold bytes the program has not
// read. Each descriptor of byInode whose inode is not in seen is copied with
// pidfd_getfd and asked directly; sockets that are not TCP over IPv4/IPv6,
// or that are closed without a peer (never connected), are skipped. The
// copies are closed before closedConns returns.
func closedConns(pid int, byInode map[uint64][]int, seen map[uint64]bool) ([]Socket, error) {
	var unseen []uint64
	for ino := range byInode {
		if !seen[ino] {
			unseen = append(unseen, ino)
		}
	}
	if len(unseen) == 0 {
		return nil, nil
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, opErr("pidfd_open", pid, -1, err)
	}
	defer unix.Close(pidfd)
	var out []Socket
	for _, ino := range unseen {
		fds := byInode[ino]
		fd, err := unix.PidfdGetfd(pidfd, fds[0], 0)
		if err == unix.EBADF {
			continue // closed meanwhile
		}
		if err == unix.EPERM {
			return nil, nil // not allowed to look: list what sock_diag showed
		}
		if err != nil {
			return nil, opErr("pidfd_getfd", pid, fds[0], err)
		}
		s, ok := closedConn(fd)
		unix.Close(fd)
		if !ok {
			continue
		}
		s.PID, s.FDs, s.Inode = pid, fds, ino
		s.Verdict = take
		out = append(out, s)
	}
	return out, nil
}

// closedConn describes fd if it is a TCP socket in CLOSE that has a peer.
// Errors mean "not one of those": the descriptor may be anything.
func closedConn(fd int) (Socket, bool) {
	var s Socket
	if p, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL); err != nil || p != unix.IPPROTO_TCP {
		return s, false
	}
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil || (dom != unix.AF_INET && dom != unix.AF_INET6) {
		return s, false
	}
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil || repair.State(info.State) != repair.StateClose {
		return s, false
	}
	// getpeername refuses a closed socket; repair.Inspect reads the peer
	// the socket keeps (and needs no sock_diag lookup in CLOSE).
	var snap repair.Snapshot
	err = repair.Inspect(fd, &snap)
	var ue *repair.UnsupportedError
	switch {
	case err == nil:
		s.Local, s.Remote = snap.Local, snap.Remote
	case errors.As(err, &ue) && ue.Remote.IsValid():
		s.Local, s.Remote = ue.Local, ue.Remote // procsock.Inspect says why not
	default:
		return s, false // never connected, or unreadable: nothing to move
	}
	if s.Remote.Port() == 0 {
		return s, false
	}
	s.Family = uint16(dom)
	s.State = repair.StateClose
	if c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE); err == nil {
		s.Cookie = c
	}
	if n, err := unix.IoctlGetInt(fd, unix.SIOCINQ); err == nil {
		s.RecvQ = uint32(n)
	}
	return s, true
}
