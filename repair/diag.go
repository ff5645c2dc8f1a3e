package repair

import (
	"encoding/binary"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sock_diag attribute types (include/uapi/linux/inet_diag.h).
const (
	inetDiagInfo     = 2
	inetDiagShutdown = 8
	inetDiagMD5Sig   = 18
	inetDiagULPInfo  = 19

	inetDiagReqLen = 56 // sizeof(struct inet_diag_req_v2)
	inetDiagMsgLen = 72 // sizeof(struct inet_diag_msg)
)

// diagInfo is what one sock_diag lookup tells about a socket that no
// getsockopt reveals.
type diagInfo struct {
	shutdown Shutdown
	md5      bool // TCP-MD5 keys are installed
	// wqueue is idiag_wqueue: for a listener, its backlog.
	wqueue uint32
}

// sockDiag looks the connection up by its exact 4-tuple and cookie with
// NETLINK_SOCK_DIAG in the calling thread's network namespace. The caller
// needs CAP_NET_ADMIN for the MD5 attribute to be reported.
func sockDiag(fd int, family uint16, local, remote netip.AddrPort) (diagInfo, error) {
	var cookie uint64
	if _, err := getsockopt(fd, unix.SOL_SOCKET, unix.SO_COOKIE, unsafe.Pointer(&cookie), 8); err != nil {
		return diagInfo{}, err
	}
	// A socket bound to a device is found only when the lookup names it.
	ifindex, err := getInt(fd, unix.SOL_SOCKET, unix.SO_BINDTOIFINDEX)
	if err != nil {
		return diagInfo{}, err
	}
	nl, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return diagInfo{}, err
	}
	defer unix.Close(nl)

	var req diagReq
	r := req.init(family, unix.NLM_F_REQUEST, ^uint32(0)) // all states
	ne := binary.NativeEndian
	binary.BigEndian.PutUint16(r[8:], local.Port())
	binary.BigEndian.PutUint16(r[10:], remote.Port())
	putDiagAddr(r[12:28], family, local.Addr())
	putDiagAddr(r[28:44], family, remote.Addr())
	ne.PutUint32(r[44:], uint32(ifindex))
	ne.PutUint64(r[48:], cookie)

	var sa unix.RawSockaddrNetlink
	sa.Family = unix.AF_NETLINK
	_, _, e := unix.Syscall6(unix.SYS_SENDTO, uintptr(nl), uintptr(unsafe.Pointer(&req[0])), uintptr(len(req)), 0,
		uintptr(unsafe.Pointer(&sa)), unix.SizeofSockaddrNetlink)
	if e != 0 {
		return diagInfo{}, e
	}
	var buf [8192]byte
	n, _, e := unix.Syscall6(unix.SYS_RECVFROM, uintptr(nl), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), 0, 0, 0)
	if e != 0 {
		return diagInfo{}, e
	}
	return parseDiag(buf[:n])
}

// diagReq is a SOCK_DIAG_BY_FAMILY request: the netlink header and a
// struct inet_diag_req_v2.
type diagReq [unix.NLMSG_HDRLEN + inetDiagReqLen]byte

// init fills in the header and the TCP request for family, the netlink
// flags and the state mask, asking for the info block (the kernel adds the
// MD5 keys only with it), and returns the inet_diag_req_v2 part for the
// caller to complete.
func (req *diagReq) init(family, flags uint16, states uint32) []byte {
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], flags)
	ne.PutUint32(req[8:], 1) // sequence
	r := req[unix.NLMSG_HDRLEN:]
	r[0] = uint8(family)
	r[1] = unix.IPPROTO_TCP
	r[2] = 1 << (inetDiagInfo - 1)
	ne.PutUint32(r[4:], states)
	return r
}

func putDiagAddr(b []byte, family uint16, a netip.Addr) {
	if family == unix.AF_INET {
		v4 := a.Unmap().As4()
		copy(b, v4[:])
		return
	}
	v6 := a.As16()
	copy(b, v6[:])
}

func parseDiag(b []byte) (diagInfo, error) {
	ne := binary.NativeEndian
	if len(b) < unix.NLMSG_HDRLEN {
		return diagInfo{}, unix.EBADMSG
	}
	mlen := int(ne.Uint32(b[0:]))
	typ := ne.Uint16(b[4:])
	if mlen > len(b) || mlen < unix.NLMSG_HDRLEN {
		return diagInfo{}, unix.EBADMSG
	}
	if typ == unix.NLMSG_ERROR {
		return diagInfo{}, errorOf(b[:mlen])
	}
	if typ != unix.SOCK_DIAG_BY_FAMILY || mlen < unix.NLMSG_HDRLEN+inetDiagMsgLen {
		return diagInfo{}, unix.EBADMSG
	}
	var info diagInfo
	info.wqueue = ne.Uint32(b[unix.NLMSG_HDRLEN+60:])
	attrs := b[unix.NLMSG_HDRLEN+inetDiagMsgLen : mlen]
	for len(attrs) >= 4 {
		alen := int(ne.Uint16(attrs[0:]))
		atyp := ne.Uint16(attrs[2:]) & 0x3fff // NLA_TYPE_MASK
		if alen < 4 || alen > len(attrs) {
			break
		}
		switch atyp {
		case inetDiagShutdown:
			if alen >= 5 {
				info.shutdown = Shutdown(attrs[4] & 3)
			}
		case inetDiagMD5Sig:
			info.md5 = alen > 4
		}
		adv := (alen + 3) &^ 3
		if adv > len(attrs) {
			break
		}
		attrs = attrs[adv:]
	}
	return info, nil
}
