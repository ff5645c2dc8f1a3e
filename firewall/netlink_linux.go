package firewall

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"

	"golang.org/x/sys/unix"
)

// This file speaks nf_tables over a raw netlink socket for the batches that
// change locks: element additions and deletions, and the table's deletion.
// google/nftables builds each set element as a tree of attribute values,
// which costs several allocations per element and, for 10,000 tuples, more
// time than the kernel takes; here a batch is written straight into one
// reused buffer. docs/firewall.md has the measurements. The layout is the
// one nft(8) sends:
//
//	nlmsghdr NFNL_MSG_BATCH_BEGIN, nfgenmsg{AF_UNSPEC, res_id NFNL_SUBSYS_NFTABLES}
//	nlmsghdr NFT_MSG_NEWSETELEM or _DELSETELEM (NLM_F_ACK), nfgenmsg{NFPROTO_INET}
//	    NFTA_SET_ELEM_LIST_TABLE  "tcpmigrate_<instance>\0"
//	    NFTA_SET_ELEM_LIST_SET    "v4\0" or "v6\0"
//	    NFTA_SET_ELEM_LIST_ELEMENTS (nested), at most 64 KiB
//	        NFTA_LIST_ELEM (nested)
//	            NFTA_SET_ELEM_KEY (nested)
//	                NFTA_DATA_VALUE  key (16 or 40 bytes)
//	        ... one NFTA_LIST_ELEM per element
//	... more element messages
//	nlmsghdr NFNL_MSG_BATCH_END
//
// The elements take the set's timeout (the lease), so they carry no
// NFTA_SET_ELEM_TIMEOUT. Keys are multiples of 4 bytes: no padding.

// Sizes of the netlink framing.
const (
	nlmsgHdrLen = unix.SizeofNlMsghdr // 16
	nfgenLen    = 4                   // struct nfgenmsg
	nlaHdrLen   = unix.SizeofNlAttr   // 4
	// maxAttrLen is the largest netlink attribute: its length is 16 bits.
	// An element list beyond it corrupts the length (the kernel then
	// misparses the message and answers ENOENT), so lists are split into
	// several messages of one batch.
	maxAttrLen = 0xffff
	// replyRoom is what one reply (an ack or an error, capped by
	// NETLINK_CAP_ACK) may take of the receive buffer, with a margin.
	replyRoom = 2048
)

// elemLen is the encoded size of an element with a key of keyLen bytes:
// NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY and NFTA_DATA_VALUE headers and the key.
func elemLen(keyLen int) int { return 3*nlaHdrLen + keyLen }

// elemsPerMsg is how many elements of keyLen bytes one message carries.
func elemsPerMsg(keyLen int) int { return (maxAttrLen - nlaHdrLen) / elemLen(keyLen) }

// msgInfo names a message of a batch in errors.
type msgInfo struct {
	typ uint16 // NFT_MSG_*
	obj string // set or table name
}

func (m msgInfo) String() string {
	name := fmt.Sprintf("message %d", m.typ)
	switch m.typ {
	case unix.NFT_MSG_NEWSETELEM:
		name = "add elements to set"
	case unix.NFT_MSG_DELSETELEM:
		name = "delete elements from set"
	case unix.NFT_MSG_DELTABLE:
		name = "delete table"
	}
	return name + " " + m.obj
}

// batch encodes one nf_tables netlink batch into a buffer that is kept
// between batches. A batch is begin, any number of messages, end.
type batch struct {
	buf  []byte
	seq  uint32    // sequence number of the BEGIN message
	msgs []msgInfo // the messages after BEGIN, each asking for an ack
}

var ne = binary.NativeEndian

// begin resets b and writes the BEGIN message with sequence number seq.
func (b *batch) begin(seq uint32) {
	b.buf = b.buf[:0]
	b.msgs = b.msgs[:0]
	b.seq = seq
	b.header(unix.NFNL_MSG_BATCH_BEGIN, unix.NLM_F_REQUEST, unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES)
}

// end writes the END message.
func (b *batch) end() {
	b.header(unix.NFNL_MSG_BATCH_END, unix.NLM_F_REQUEST, unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES)
}

// header appends a message header and nfgenmsg, with the message length
// set to the header alone, and returns the offset of the message. Every
// message gets the next sequence number.
func (b *batch) header(typ, flags uint16, family uint8, resID uint16) int {
	off := len(b.buf)
	seq := b.seq + uint32(len(b.msgs))
	if typ != unix.NFNL_MSG_BATCH_BEGIN {
		seq++
	}
	b.buf = ne.AppendUint32(b.buf, nlmsgHdrLen+nfgenLen)
	b.buf = ne.AppendUint16(b.buf, typ)
	b.buf = ne.AppendUint16(b.buf, flags)
	b.buf = ne.AppendUint32(b.buf, seq)
	b.buf = ne.AppendUint32(b.buf, 0) // port ID: the kernel's
	b.buf = append(b.buf, family, unix.NFNETLINK_V0)
	b.buf = binary.BigEndian.AppendUint16(b.buf, resID)
	return off
}

// message starts an nf_tables message that asks for an ack and returns its
// offset for finishMsg.
func (b *batch) message(typ, flags uint16, obj string) int {
	off := b.header(unix.NFNL_SUBSYS_NFTABLES<<8|typ, unix.NLM_F_REQUEST|unix.NLM_F_ACK|flags, unix.NFPROTO_INET, 0)
	b.msgs = append(b.msgs, msgInfo{typ, obj})
	return off
}

// finishMsg and finishAttr set the length of the message or attribute at
// off, whose length field comes first: 32 bits for a message, 16 for an
// attribute.
func (b *batch) finishMsg(off int)  { ne.PutUint32(b.buf[off:], uint32(len(b.buf)-off)) }
func (b *batch) finishAttr(off int) { ne.PutUint16(b.buf[off:], uint16(len(b.buf)-off)) }

// attr starts an attribute, to be finished with finishAttr.
func (b *batch) attr(typ uint16) int {
	off := len(b.buf)
	b.buf = ne.AppendUint16(b.buf, nlaHdrLen)
	b.buf = ne.AppendUint16(b.buf, typ)
	return off
}

// str appends a NUL-terminated string attribute, padded to 4 bytes.
func (b *batch) str(typ uint16, s string) {
	off := b.attr(typ)
	b.buf = append(b.buf, s...)
	b.buf = append(b.buf, 0)
	b.finishAttr(off)
	for len(b.buf)%4 != 0 {
		b.buf = append(b.buf, 0)
	}
}

// elementsLen is at most the number of bytes elements appends for n bytes
// of keys of keyLen bytes, with a table name of tableLen bytes.
func elementsLen(tableLen, keyLen, n int) int {
	elems := n / keyLen
	msgs := (elems + elemsPerMsg(keyLen) - 1) / elemsPerMsg(keyLen)
	// Header, nfgenmsg, table and set (with NUL and padding), list header.
	perMsg := nlmsgHdrLen + nfgenLen + nlaHdrLen + tableLen + 4 + nlaHdrLen + 4 + nlaHdrLen
	return elems*elemLen(keyLen) + msgs*perMsg
}

// reserve makes room in b for n more bytes.
func (b *batch) reserve(n int) { b.buf = slices.Grow(b.buf, n) }

// elements appends messages of type typ (NFT_MSG_NEWSETELEM or
// NFT_MSG_DELSETELEM) for every key in keys, each keyLen bytes, as many
// messages as the attribute limit needs.
func (b *batch) elements(typ uint16, table, set string, keyLen int, keys []byte) {
	var flags uint16
	if typ == unix.NFT_MSG_NEWSETELEM {
		flags = unix.NLM_F_CREATE // and no NLM_F_EXCL: adding what is there is a no-op
	}
	el := elemLen(keyLen)
	for len(keys) > 0 {
		n := min(len(keys)/keyLen, elemsPerMsg(keyLen))
		m := b.message(typ, flags, set)
		b.str(unix.NFTA_SET_ELEM_LIST_TABLE, table)
		b.str(unix.NFTA_SET_ELEM_LIST_SET, set)
		list := b.attr(unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_LIST_ELEMENTS)
		at := len(b.buf)
		b.buf = append(b.buf, make([]byte, n*el)...) // one growth per message
		for i := range n {
			e := b.buf[at+i*el:]
			ne.PutUint16(e[0:], uint16(el))
			ne.PutUint16(e[2:], unix.NLA_F_NESTED|unix.NFTA_LIST_ELEM)
			ne.PutUint16(e[4:], uint16(el-nlaHdrLen))
			ne.PutUint16(e[6:], unix.NLA_F_NESTED|unix.NFTA_SET_ELEM_KEY)
			ne.PutUint16(e[8:], uint16(el-2*nlaHdrLen))
			ne.PutUint16(e[10:], unix.NFTA_DATA_VALUE)
			copy(e[12:12+keyLen], keys[i*keyLen:])
		}
		b.finishAttr(list)
		b.finishMsg(m)
		keys = keys[n*keyLen:]
	}
}

// delTable appends the deletion of table.
func (b *batch) delTable(table string) {
	m := b.message(unix.NFT_MSG_DELTABLE, 0, table)
	b.str(unix.NFTA_TABLE_NAME, table)
	b.finishMsg(m)
}

// flushChain appends the deletion of every rule of chain in table
// (NFT_MSG_DELRULE naming the chain and no rule: nft_delrule_by_chain).
func (b *batch) flushChain(table, chain string) {
	m := b.message(unix.NFT_MSG_DELRULE, 0, chain)
	b.str(unix.NFTA_RULE_TABLE, table)
	b.str(unix.NFTA_RULE_CHAIN, chain)
	b.finishMsg(m)
}

// errMissingReplies means the kernel answered fewer messages of a batch
// than it was sent, so whether the batch was applied is unknown.
var errMissingReplies = errors.New("netlink: replies missing")

// nfSocket is a NETLINK_NETFILTER socket, opened in a namespace. Its use is
// synchronous: the kernel processes a batch, and queues every reply, within
// the sendmsg call that carries it. Not safe for concurrent use.
type nfSocket struct {
	fd     int
	seq    uint32
	sndbuf int // the kernel's limits, as getsockopt reports them
	rcvbuf int
	rbuf   []byte
}

// dialNF opens a netfilter netlink socket in the namespace nsfd.
func dialNF(nsfd int) (*nfSocket, error) {
	s := &nfSocket{fd: -1, rbuf: make([]byte, 8192)}
	err := inNetNS(nsfd, func() error {
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
		if err != nil {
			return os.NewSyscallError("socket netlink", err)
		}
		s.fd = fd
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := s.setup(); err != nil {
		unix.Close(s.fd)
		return nil, err
	}
	return s, nil
}

func (s *nfSocket) setup() error {
	if err := unix.Bind(s.fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return os.NewSyscallError("bind netlink", err)
	}
	// Errors carry only the header of the failed message, not a copy of
	// its 64 KiB of elements.
	if err := unix.SetsockoptInt(s.fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1); err != nil {
		return os.NewSyscallError("setsockopt NETLINK_CAP_ACK", err)
	}
	var err error
	if s.sndbuf, err = unix.GetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_SNDBUF); err != nil {
		return os.NewSyscallError("getsockopt SO_SNDBUF", err)
	}
	if s.rcvbuf, err = unix.GetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_RCVBUF); err != nil {
		return os.NewSyscallError("getsockopt SO_RCVBUF", err)
	}
	s.seq = 1
	return nil
}

func (s *nfSocket) close() error { return unix.Close(s.fd) }

// ensure raises the socket buffer opt (SO_SNDBUF or SO_RCVBUF), whose
// current size is *cur, to hold need bytes. The FORCE variants (with
// CAP_NET_ADMIN, which nftables needs anyway) may exceed the sysctl maxima.
func (s *nfSocket) ensure(force, opt int, cur *int, need int) error {
	if need <= *cur {
		return nil
	}
	n := max(need, 2**cur)
	err := unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, force, n)
	if err == unix.EPERM {
		err = unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, opt, n)
	}
	if err != nil {
		return os.NewSyscallError("setsockopt socket buffer", err)
	}
	v, err := unix.GetsockoptInt(s.fd, unix.SOL_SOCKET, opt)
	if err != nil {
		return os.NewSyscallError("getsockopt socket buffer", err)
	}
	*cur = v
	if v < need {
		return fmt.Errorf("netlink: socket buffer of %d bytes needed, got %d: %w", need, v, unix.ENOBUFS)
	}
	return nil
}

// send sends b in one sendmsg and reads its replies. It returns the first
// error the kernel reported; a batch with an error is not applied. After an
// error the socket may hold stray replies: the caller must close it.
func (s *nfSocket) send(b *batch) error {
	if len(b.msgs) == 0 {
		return nil
	}
	// Netlink refuses a message larger than the send buffer (EMSGSIZE).
	if err := s.ensure(unix.SO_SNDBUFFORCE, unix.SO_SNDBUF, &s.sndbuf, len(b.buf)+4096); err != nil {
		return err
	}
	// A reply that does not fit is dropped (ENOBUFS), and with it the
	// knowledge of what the batch did.
	if err := s.ensure(unix.SO_RCVBUFFORCE, unix.SO_RCVBUF, &s.rcvbuf, (len(b.msgs)+2)*replyRoom); err != nil {
		return err
	}
	for {
		err := unix.Sendto(s.fd, b.buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return os.NewSyscallError("sendmsg netlink", err)
		}
		break
	}
	s.seq = b.seq + uint32(len(b.msgs)) + 2
	return s.replies(b)
}

// replies reads the kernel's answers to b: one ack or error per message,
// and for a batch that failed as a whole, an error for BEGIN. They are all
// queued by the time sendmsg returns, so reading never waits.
func (s *nfSocket) replies(b *batch) error {
	var first error
	got := 0
	for got < len(b.msgs) {
		n, _, err := unix.Recvfrom(s.fd, s.rbuf, unix.MSG_DONTWAIT)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			if first != nil {
				return first
			}
			return fmt.Errorf("%w: %d of %d", errMissingReplies, len(b.msgs)-got, len(b.msgs))
		case err != nil:
			return os.NewSyscallError("recvmsg netlink", err)
		}
		for p := s.rbuf[:n]; len(p) >= nlmsgHdrLen; {
			l := int(ne.Uint32(p))
			if l < nlmsgHdrLen || l > len(p) {
				return fmt.Errorf("netlink: malformed reply")
			}
			typ, seq := ne.Uint16(p[4:]), ne.Uint32(p[8:])
			if typ != unix.NLMSG_ERROR || l < nlmsgHdrLen+4 {
				return fmt.Errorf("netlink: unexpected reply of type %d", typ)
			}
			errno := -int32(ne.Uint32(p[nlmsgHdrLen:]))
			switch i := seq - b.seq; {
			case i == 0: // BEGIN: the batch as a whole failed
				if errno != 0 && first == nil {
					first = fmt.Errorf("netlink: batch: %w", unix.Errno(errno))
				}
			case int(i) <= len(b.msgs):
				got++
				if errno != 0 && first == nil {
					first = fmt.Errorf("netlink: %v: %w", b.msgs[i-1], unix.Errno(errno))
				}
			default:
				return fmt.Errorf("netlink: reply to unknown message %d", seq)
			}
			p = p[min((l+3)&^3, len(p)):]
		}
	}
	return first
}
