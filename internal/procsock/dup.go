package procsock

import (
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Dup copies descriptors fds of process pid into the calling process with
// pidfd_open(2) and pidfd_getfd(2), and returns them in the same order. The
// copies refer to the same open files (the same sockets), carry
// close-on-exec, and are owned by the caller, who closes them. The process
// keeps its own descriptors.
//
// The caller needs PTRACE_MODE_ATTACH over the process: CAP_SYS_PTRACE, or
// the same user under a permissive Yama ptrace scope. On any failure every
// copy made so far is closed and nothing is returned.
//
// The copies share the open file description with the process, and with it
// the file status flags such as O_NONBLOCK: os.NewFile and (*os.File).Fd
// leave them alone, but net.FileConn sets O_NONBLOCK and so would change
// the process's own socket under it. Use the copies through Fd or
// SyscallConn.
func Dup(pid int, fds []int) ([]*os.File, error) {
	raw, err := dupRaw(pid, fds)
	if err != nil {
		return nil, err
	}
	return wrap(pid, fds, raw), nil
}

func dupRaw(pid int, fds []int) ([]int, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, opErr("pidfd_open", pid, -1, err)
	}
	defer unix.Close(pidfd)
	raw := make([]int, 0, len(fds))
	for _, fd := range fds {
		nfd, err := unix.PidfdGetfd(pidfd, fd, 0)
		if err != nil {
			closeRaw(raw)
			return nil, opErr("pidfd_getfd", pid, fd, err)
		}
		raw = append(raw, nfd)
	}
	return raw, nil
}

// wrap makes files of raw descriptors. os.NewFile changes no flag of the
// open file (it only registers a non-blocking one with the poller).
func wrap(pid int, fds, raw []int) []*os.File {
	files := make([]*os.File, len(raw))
	for i, nfd := range raw {
		files[i] = os.NewFile(uintptr(nfd), "pid"+strconv.Itoa(pid)+":fd"+strconv.Itoa(fds[i]))
	}
	return files
}

// DupSockets duplicates the lowest descriptor of each socket, as Dup does,
// and checks that each copy still refers to the socket List reported (same
// inode, and a socket at all): between List and the freeze the process may
// have closed a descriptor and reused its number. A socket without a
// descriptor fails with ErrNoDescriptor, a changed one with ErrChanged or
// ErrNotSocket; in every failure all copies are closed.
func DupSockets(pid int, socks []Socket) ([]*os.File, error) {
	fds := make([]int, len(socks))
	for i := range socks {
		if fds[i] = socks[i].FD(); fds[i] < 0 {
			return nil, opErr("dup socket "+socks[i].Local.String()+"->"+socks[i].Remote.String(), pid, -1, ErrNoDescriptor)
		}
	}
	raw, err := dupRaw(pid, fds)
	if err != nil {
		return nil, err
	}
	for i, nfd := range raw {
		var st unix.Stat_t
		if err := unix.Fstat(nfd, &st); err != nil {
			closeRaw(raw)
			return nil, opErr("fstat duplicate", pid, fds[i], err)
		}
		switch {
		case st.Mode&unix.S_IFMT != unix.S_IFSOCK:
			err = ErrNotSocket
		case st.Ino != socks[i].Inode:
			err = ErrChanged
		}
		if err != nil {
			closeRaw(raw)
			return nil, opErr("check duplicate", pid, fds[i], err)
		}
	}
	return wrap(pid, fds, raw), nil
}

func closeRaw(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
