package procsock

import (
	"encoding/binary"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// sock_diag layout (include/uapi/linux/inet_diag.h).
const (
	inetDiagReqLen = 56 // sizeof(struct inet_diag_req_v2)
	inetDiagMsgLen = 72 // sizeof(struct inet_diag_msg)
	allStates      = ^uint32(0)
	dumpBufLen     = 64 << 10
)

// diagEntry is one socket of a sock_diag dump.
type diagEntry struct {
	family        uint16
	state         repair.State
	local, remote netip.AddrPort
	cookie        uint64
	inode         uint64
	recvQ, sendQ  uint32
}

// dumpTCP lists every TCP socket, IPv4 and IPv6, in all states, of the
// network namespace that the NETLINK_SOCK_DIAG socket nl belongs to.
func dumpTCP(nl int) ([]diagEntry, error) {
	var out []diagEntry
	buf := make([]byte, dumpBufLen)
	for i, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		seq := uint32(i + 1)
		var err error
		if out, err = dumpFamily(nl, family, seq, buf, out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func dumpFamily(nl int, family uint8, seq uint32, buf []byte, out []diagEntry) ([]diagEntry, error) {
	var req [unix.NLMSG_HDRLEN + inetDiagReqLen]byte
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(req[8:], seq)
	r := req[unix.NLMSG_HDRLEN:]
	r[0] = family
	r[1] = unix.IPPROTO_TCP
	ne.PutUint32(r[4:], allStates)
	if err := unix.Sendto(nl, req[:], 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return out, err
	}
	for {
		n, _, err := unix.Recvfrom(nl, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return out, err
		}
		var done bool
		out, done, err = parseDump(buf[:n], seq, out)
		if err != nil || done {
			return out, err
		}
	}
}

// parseDump appends the sockets of one datagram of a dump reply to out and
// says whether the dump is complete. Messages of another sequence number
// (a late reply to an earlier request) are skipped.
func parseDump(b []byte, seq uint32, out []diagEntry) (_ []diagEntry, done bool, _ error) {
	ne := binary.NativeEndian
	for len(b) >= unix.NLMSG_HDRLEN {
		mlen := int(ne.Uint32(b[0:]))
		typ := ne.Uint16(b[4:])
		mseq := ne.Uint32(b[8:])
		if mlen < unix.NLMSG_HDRLEN || mlen > len(b) {
			return out, false, unix.EBADMSG
		}
		msg := b[unix.NLMSG_HDRLEN:mlen]
		if adv := nlmsgAlign(mlen); adv < len(b) {
			b = b[adv:]
		} else {
			b = nil
		}
		if mseq != seq {
			continue
		}
		switch typ {
		case unix.NLMSG_DONE:
			return out, true, nil
		case unix.NLMSG_ERROR:
			if len(msg) >= 4 {
				if errno := -int32(ne.Uint32(msg)); errno > 0 {
					return out, false, unix.Errno(errno)
				}
				continue // an acknowledgement
			}
			return out, false, unix.EBADMSG
		case unix.SOCK_DIAG_BY_FAMILY:
			e, err := parseDiagMsg(msg)
			if err != nil {
				return out, false, err
			}
			out = append(out, e)
		}
	}
	return out, false, nil
}

func nlmsgAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// parseDiagMsg decodes a struct inet_diag_msg. Attributes after it are
// ignored.
func parseDiagMsg(m []byte) (diagEntry, error) {
	if len(m) < inetDiagMsgLen {
		return diagEntry{}, unix.EBADMSG
	}
	ne := binary.NativeEndian
	e := diagEntry{
		family: uint16(m[0]),
		state:  repair.State(m[1]),
		// m[2:4]: timer, retransmits
		cookie: uint64(ne.Uint32(m[44:])) | uint64(ne.Uint32(m[48:]))<<32,
		recvQ:  ne.Uint32(m[56:]),
		sendQ:  ne.Uint32(m[60:]),
		// m[64:68]: uid
		inode: uint64(ne.Uint32(m[68:])),
	}
	sport := binary.BigEndian.Uint16(m[4:])
	dport := binary.BigEndian.Uint16(m[6:])
	switch e.family {
	case unix.AF_INET:
		e.local = netip.AddrPortFrom(netip.AddrFrom4([4]byte(m[8:12])), sport)
		e.remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte(m[24:28])), dport)
	case unix.AF_INET6:
		e.local = netip.AddrPortFrom(netip.AddrFrom16([16]byte(m[8:24])), sport)
		e.remote = netip.AddrPortFrom(netip.AddrFrom16([16]byte(m[24:40])), dport)
	default:
		return diagEntry{}, unix.EAFNOSUPPORT
	}
	return e, nil
}
