package repair

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"strconv"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SegmentFlags are the TCP header flags of a crafted Segment, with the
// values of the header's flag bits.
type SegmentFlags uint8

// The flags a crafted segment may carry.
const (
	SegFIN SegmentFlags = 0x01
	SegSYN SegmentFlags = 0x02
	SegRST SegmentFlags = 0x04
	SegPSH SegmentFlags = 0x08
	SegACK SegmentFlags = 0x10
)

// String returns the flags as tcpdump prints them, such as "F." for FIN+ACK.
func (f SegmentFlags) String() string {
	var b []byte
	for _, x := range [...]struct {
		f SegmentFlags
		c byte
	}{{SegSYN, 'S'}, {SegFIN, 'F'}, {SegPSH, 'P'}, {SegRST, 'R'}, {SegACK, '.'}} {
		if f&x.f != 0 {
			b = append(b, x.c)
		}
	}
	if rest := f &^ (SegFIN | SegSYN | SegRST | SegPSH | SegACK); rest != 0 {
		b = append(b, "+0x"+strconv.FormatUint(uint64(rest), 16)...)
	}
	if len(b) == 0 {
		return "none"
	}
	return string(b)
}

// Segment is a TCP segment crafted as if the connection's peer had sent it
// (REPAIR-NOTES 5.2): From is the peer's address and port, To the local
// endpoint's. It carries no TCP options and no payload. Window is the raw
// 16-bit header field; the receiver scales it by its snd_wscale.
type Segment struct {
	From, To netip.AddrPort
	Seq, Ack uint32
	Flags    SegmentFlags
	Window   uint16
}

// ErrSegmentFamily means a Segment's addresses are invalid or of two
// different families.
var ErrSegmentFamily = errors.New("repair: segment addresses must be valid and of one family")

// Header sizes of a crafted segment.
const (
	ipv4HeaderLen = 20
	ipv6HeaderLen = 40
	tcpHeaderLen  = 20
	segmentTTL    = 64
)

// Injector sends crafted segments to sockets of its network namespace
// through raw sockets (IPPROTO_RAW: the IP header is supplied) marked with
// SO_MARK, so that they pass a firewall lock that accepts that mark. A
// segment to a local address crosses output, loops back and crosses
// prerouting and input, like one from the wire.
//
// An Injector is safe for concurrent use, and concurrent sends run in
// parallel (a send's cost is mostly the receiving socket's answer, which
// the kernel runs inside the sender's system call). Send does not allocate.
type Injector struct {
	mark uint32

	mu     sync.RWMutex // Send holds it shared, Close exclusively
	fd4    int          // AF_INET raw socket
	fd6    int          // AF_INET6 raw socket, -1 if the namespace has no IPv6
	err6   error        // why fd6 is -1
	closed bool
}

// NewInjector opens the raw sockets (IPv4 and, when the namespace has it,
// IPv6) in the network namespace of the calling thread and sets SO_MARK to
// mark on both. It needs CAP_NET_RAW and CAP_NET_ADMIN. A caller running in
// another namespace pins its goroutine to the thread (as nsdo.Do does)
// before calling. The sockets are reused by every Send until Close.
func NewInjector(mark uint32) (*Injector, error) {
	in := &Injector{mark: mark, fd4: -1, fd6: -1}
	fd, op, err := openRaw(unix.AF_INET, mark)
	if err != nil {
		return nil, &OpError{Op: "open injector: " + op, Err: err}
	}
	in.fd4 = fd
	switch fd, op, err := openRaw(unix.AF_INET6, mark); {
	case err == nil:
		in.fd6 = fd
	case errors.Is(err, unix.EAFNOSUPPORT):
		in.err6 = &OpError{Op: "open injector: " + op, Err: err}
	default:
		unix.Close(in.fd4)
		return nil, &OpError{Op: "open injector: " + op, Err: err}
	}
	return in, nil
}

// openRaw opens a header-included raw socket of family with SO_MARK set; on
// error it names the step that failed.
func openRaw(family int, mark uint32) (fd int, op string, err error) {
	name := "AF_INET"
	if family == unix.AF_INET6 {
		name = "AF_INET6"
	}
	fd, err = unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return -1, "socket(" + name + ", SOCK_RAW, IPPROTO_RAW)", err
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
		unix.Close(fd)
		return -1, "setsockopt SO_MARK on " + name + " raw socket", err
	}
	return fd, "", nil
}

// Mark returns the packet mark the injector's segments carry.
func (in *Injector) Mark() uint32 { return in.mark }

// Send builds seg (IP header with TTL or hop limit 64, TCP header with its
// checksum over the pseudo-header, no options) and sends it. IPv4-mapped
// addresses are sent as IPv4. A nil error says the kernel took the packet,
// not that the socket accepted it: callers that depend on the effect check
// the socket's state afterwards.
func (in *Injector) Send(seg Segment) error {
	from, to := seg.From.Addr().Unmap(), seg.To.Addr().Unmap()
	opErr := func(op string, err error) error {
		return &OpError{Op: op + " (" + seg.Flags.String() + " seq " + strconv.FormatUint(uint64(seg.Seq), 10) + ")", Local: seg.To, Remote: seg.From, Err: err}
	}
	if !from.IsValid() || !to.IsValid() || from.Is4() != to.Is4() {
		return opErr("inject segment", ErrSegmentFamily)
	}
	in.mu.RLock()
	defer in.mu.RUnlock()
	if in.closed {
		return opErr("inject segment", unix.EBADF)
	}
	var pkt [ipv6HeaderLen + tcpHeaderLen]byte
	family, fd := uint16(unix.AF_INET), in.fd4
	var n int
	if from.Is4() {
		n = buildSegment4(pkt[:], from, to, &seg)
	} else {
		if in.fd6 < 0 {
			return opErr("inject segment", in.err6)
		}
		family, fd = unix.AF_INET6, in.fd6
		n = buildSegment6(pkt[:], from, to, &seg)
	}
	var rsa unix.RawSockaddrAny
	salen, err := toRaw(family, netip.AddrPortFrom(to, 0), &rsa)
	if err != nil {
		return opErr("inject segment", err)
	}
	for {
		_, _, e := unix.Syscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&pkt[0])), uintptr(n), 0,
			uintptr(unsafe.Pointer(&rsa)), uintptr(salen))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return opErr("inject segment: sendto", e)
		}
		return nil
	}
}

// Close closes the raw sockets. It is idempotent.
func (in *Injector) Close() error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.closed {
		return nil
	}
	in.closed = true
	var err error
	for _, fd := range []int{in.fd4, in.fd6} {
		if fd >= 0 {
			if e := unix.Close(fd); e != nil && err == nil {
				err = &OpError{Op: "close injector", Err: e}
			}
		}
	}
	return err
}

// buildSegment4 writes the IPv4 packet of seg into b and returns its length.
func buildSegment4(b []byte, from, to netip.Addr, seg *Segment) int {
	const n = ipv4HeaderLen + tcpHeaderLen
	ip := b[:ipv4HeaderLen]
	ip[0] = 0x45 // version 4, header length 5 words
	ip[1] = 0    // DSCP/ECN
	binary.BigEndian.PutUint16(ip[2:], n)
	binary.BigEndian.PutUint16(ip[4:], 0)      // ID: the kernel picks one
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF
	ip[8] = segmentTTL
	ip[9] = unix.IPPROTO_TCP
	ip[10], ip[11] = 0, 0
	s, d := from.As4(), to.As4()
	copy(ip[12:16], s[:])
	copy(ip[16:20], d[:])
	binary.BigEndian.PutUint16(ip[10:], ^uint16(fold(sum(0, ip))))

	putTCP(b[ipv4HeaderLen:n], seg, s[:], d[:])
	return n
}

// buildSegment6 writes the IPv6 packet of seg into b and returns its length.
func buildSegment6(b []byte, from, to netip.Addr, seg *Segment) int {
	const n = ipv6HeaderLen + tcpHeaderLen
	ip := b[:ipv6HeaderLen]
	binary.BigEndian.PutUint32(ip[0:], 6<<28) // version 6, no traffic class, no flow label
	binary.BigEndian.PutUint16(ip[4:], tcpHeaderLen)
	ip[6] = unix.IPPROTO_TCP
	ip[7] = segmentTTL
	s, d := from.As16(), to.As16()
	copy(ip[8:24], s[:])
	copy(ip[24:40], d[:])

	putTCP(b[ipv6HeaderLen:n], seg, s[:], d[:])
	return n
}

// putTCP writes the 20-byte TCP header of seg into b, with its checksum
// over the pseudo-header of the source and destination addresses src and
// dst. Both families' pseudo-headers add up to the addresses, the protocol
// and the TCP length (IPv4: zero, protocol, 16-bit length; IPv6, RFC 8200
// 8.1: 32-bit length, three zero bytes, next header).
func putTCP(b []byte, seg *Segment, src, dst []byte) {
	binary.BigEndian.PutUint16(b[0:], seg.From.Port())
	binary.BigEndian.PutUint16(b[2:], seg.To.Port())
	binary.BigEndian.PutUint32(b[4:], seg.Seq)
	binary.BigEndian.PutUint32(b[8:], seg.Ack)
	b[12] = (tcpHeaderLen / 4) << 4
	b[13] = byte(seg.Flags)
	binary.BigEndian.PutUint16(b[14:], seg.Window)
	b[16], b[17] = 0, 0 // checksum, below
	b[18], b[19] = 0, 0 // urgent pointer
	c := sum(sum(0, src), dst) + unix.IPPROTO_TCP + tcpHeaderLen
	binary.BigEndian.PutUint16(b[16:], ^uint16(fold(sum(c, b))))
}

// sum adds b to the one's-complement accumulator c as 16-bit big-endian
// words (an odd last byte is padded with zero).
func sum(c uint32, b []byte) uint32 {
	for len(b) >= 2 {
		c += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		c += uint32(b[0]) << 8
	}
	return c
}

// fold folds the carries of a one's-complement accumulator into 16 bits.
func fold(c uint32) uint32 {
	for c > 0xffff {
		c = c&0xffff + c>>16
	}
	return c
}
