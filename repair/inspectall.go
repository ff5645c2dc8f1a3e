package repair

import (
	"encoding/binary"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// An Inspector runs Inspect on many sockets of one network namespace.
// Where Inspect looks each connection up with its own sock_diag request (a
// netlink socket, a request and a reply: about 25 µs), an Inspector dumps
// the namespace's TCP connections once per address family, on first use,
// and finds each socket in the dump by its cookie; a socket the dump does
// not hold (opened after it) is looked up on its own. The zero value is
// ready to use; use one Inspector for one batch, from goroutines that are
// all in the sockets' network namespace: it is safe for concurrent use
// (the first to need a family's dump takes it while the others wait).
type Inspector struct {
	mu    sync.Mutex // guards dumps
	dumps map[uint16]map[uint64]diagInfo
}

// Inspect is the package's Inspect, answered from the dumps.
func (in *Inspector) Inspect(fd int, s *Snapshot) error {
	return inspect(fd, s, in.lookup)
}

// lookup is sockDiag answered from the family's dump, taken on first use,
// when the socket is in it. A dump, once taken, is only read.
func (in *Inspector) lookup(fd int, s *Snapshot) (diagInfo, error) {
	var cookie uint64
	if _, err := getsockopt(fd, unix.SOL_SOCKET, unix.SO_COOKIE, unsafe.Pointer(&cookie), 8); err != nil {
		return diagInfo{}, err
	}
	family := s.Family
	in.mu.Lock()
	if in.dumps == nil {
		in.dumps = map[uint16]map[uint64]diagInfo{}
	}
	m, ok := in.dumps[family]
	if !ok {
		var err error
		if m, err = dumpDiag(family); err != nil {
			m = nil // fall back to one lookup per socket
		}
		in.dumps[family] = m
	}
	in.mu.Unlock()
	if info, ok := m[cookie]; ok {
		return info, nil
	}
	return sockDiag(fd, family, s.Local, s.Remote)
}

// dumpDiag dumps every TCP socket of family in the calling thread's network
// namespace, with the same information an exact lookup returns (the info
// block, so that the kernel adds the MD5 keys), keyed by socket cookie.
func dumpDiag(family uint16) (map[uint64]diagInfo, error) {
	nl, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, err
	}
	defer unix.Close(nl)
	var req diagReq
	req.init(family, unix.NLM_F_REQUEST|unix.NLM_F_DUMP, ^uint32(0)&^(1<<StateListen|1<<StateTimeWait|1<<StateNewSynRecv|1<<StateSynRecv))
	ne := binary.NativeEndian
	if err := unix.Sendto(nl, req[:], 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	out := map[uint64]diagInfo{}
	buf := make([]byte, 1<<16)
	for {
		n, _, err := unix.Recvfrom(nl, buf, 0)
		if err != nil {
			return nil, err
		}
		b := buf[:n]
		for len(b) >= unix.NLMSG_HDRLEN {
			mlen := int(ne.Uint32(b[0:]))
			if mlen < unix.NLMSG_HDRLEN || mlen > len(b) {
				return nil, unix.EBADMSG
			}
			switch ne.Uint16(b[4:]) {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				return nil, errorOf(b[:mlen])
			case unix.SOCK_DIAG_BY_FAMILY:
				if mlen < unix.NLMSG_HDRLEN+inetDiagMsgLen {
					return nil, unix.EBADMSG
				}
				info, err := parseDiag(b[:mlen])
				if err != nil {
					return nil, err
				}
				id := b[unix.NLMSG_HDRLEN+4:]
				cookie := uint64(ne.Uint32(id[40:])) | uint64(ne.Uint32(id[44:]))<<32
				out[cookie] = info
			}
			b = b[min((mlen+3)&^3, len(b)):]
		}
	}
}

// errorOf is the errno of an NLMSG_ERROR message.
func errorOf(b []byte) error {
	if len(b) >= unix.NLMSG_HDRLEN+4 {
		if errno := -int32(binary.NativeEndian.Uint32(b[unix.NLMSG_HDRLEN:])); errno > 0 {
			return unix.Errno(errno)
		}
	}
	return unix.EBADMSG
}
