package procsock

import (
	"cmp"
	"errors"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// List returns every TCP socket, IPv4 and IPv6, that process pid holds a
// descriptor for, each once with all its descriptors, in the order of their
// lowest descriptor, and with the verdict of send --pid before any port
// filter: established, half-closed and connecting (SYN_SENT) connections
// are taken, listeners are not (see Reason).
//
// Closed connections (CLOSE: both FINs exchanged, or reset, possibly with
// bytes still unread) are out of the kernel's lookup tables and so out of
// sock_diag's dump: List finds them by asking each socket descriptor the
// dump did not account for (a copy made with pidfd_getfd) and takes those
// that are TCP, closed and have a peer. Without the right to copy the
// process's descriptors (PTRACE_MODE_ATTACH) it leaves them out.
//
// After them come the connections on the same local ports that no
// descriptor refers to: TIME_WAIT, orphaned (closed by the process while
// data or a FIN was still in flight) and not yet accepted. They are listed
// with ReasonNoDescriptor because they stay behind by design; a process
// that has none of them is not affected.
//
// List reads /proc/PID/fd and dumps sock_diag in the process's network
// namespace; it needs to be allowed to read the process's descriptors (the
// same user, or CAP_SYS_PTRACE) and, when the namespace is not the
// caller's, CAP_SYS_ADMIN. Sockets of other families and protocols (UDP,
// Unix, netlink) are not reported, nor are TCP sockets the process created
// in another network namespace than the one it is in now (they are not in
// its namespace's dump). The result is a snapshot: a process that is not
// frozen may open and close sockets meanwhile.
func List(pid int) ([]Socket, error) {
	byInode, err := socketFDs(pid)
	if err != nil {
		return nil, err
	}
	nl, err := diagSocket(pid)
	if err != nil {
		return nil, err
	}
	entries, err := dumpTCP(nl)
	unix.Close(nl)
	if err != nil {
		return nil, opErr("sock_diag dump", pid, -1, err)
	}

	var held, behind []Socket
	ports := map[uint16]bool{}
	seen := map[uint64]bool{}
	listed := map[uint64]bool{} // inodes sock_diag reported
	for _, e := range entries {
		fds := byInode[e.inode]
		if e.inode == 0 || len(fds) == 0 || seen[e.cookie] {
			continue
		}
		seen[e.cookie] = true
		listed[e.inode] = true
		s := socketOf(pid, e)
		s.FDs = fds
		s.Inode = e.inode
		s.Verdict = verdictFor(e.state)
		held = append(held, s)
		if p := e.local.Port(); p != 0 {
			ports[p] = true
		}
	}
	closed, err := closedConns(pid, byInode, listed)
	if err != nil {
		return nil, err
	}
	for _, s := range closed {
		seen[s.Cookie] = true
		held = append(held, s)
	}
	for _, e := range entries {
		if e.inode != 0 || !ports[e.local.Port()] || seen[e.cookie] {
			continue
		}
		seen[e.cookie] = true
		s := socketOf(pid, e)
		s.Verdict = verdictBehind(e.state)
		behind = append(behind, s)
	}
	slices.SortFunc(held, func(a, b Socket) int { return cmp.Compare(a.FDs[0], b.FDs[0]) })
	slices.SortStableFunc(behind, func(a, b Socket) int {
		return cmp.Or(
			cmp.Compare(a.Local.Port(), b.Local.Port()),
			a.Remote.Compare(b.Remote),
			cmp.Compare(a.State, b.State))
	})
	return append(held, behind...), nil
}

func socketOf(pid int, e diagEntry) Socket {
	return Socket{
		PID:    pid,
		Cookie: e.cookie,
		Family: e.family,
		Local:  e.local,
		Remote: e.remote,
		State:  e.state,
		RecvQ:  e.recvQ,
		SendQ:  e.sendQ,
	}
}

// socketFDs maps the inode of every socket process pid has a descriptor for
// to those descriptors, in ascending order. A descriptor closed during the
// walk is skipped.
func socketFDs(pid int) (map[uint64][]int, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, opErr("read "+dir, pid, -1, unwrapPath(err))
	}
	out := map[uint64][]int{}
	for _, ent := range ents {
		fd, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		target, err := os.Readlink(dir + "/" + ent.Name())
		if errors.Is(err, fs.ErrNotExist) {
			continue // closed meanwhile
		}
		if err != nil {
			return nil, opErr("readlink", pid, fd, unwrapPath(err))
		}
		if ino, ok := socketInode(target); ok {
			out[ino] = append(out[ino], fd)
		}
	}
	for _, fds := range out {
		slices.Sort(fds)
	}
	return out, nil
}

// socketInode parses the "socket:[INODE]" link of a socket descriptor.
func socketInode(link string) (uint64, bool) {
	s, ok := strings.CutPrefix(link, "socket:[")
	if !ok {
		return 0, false
	}
	s, ok = strings.CutSuffix(s, "]")
	if !ok {
		return 0, false
	}
	ino, err := strconv.ParseUint(s, 10, 64)
	return ino, err == nil
}

// unwrapPath drops the *fs.PathError around an errno: the path is in Op.
func unwrapPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
