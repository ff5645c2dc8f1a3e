package firewall

import (
	"encoding/binary"
	"net/netip"
)

// Tuple is one TCP connection as seen from the host that owns it: its local
// and remote address and port.
//
// IPv4-mapped IPv6 addresses (::ffff:198.18.0.1) name IPv4 endpoints and are
// locked as plain IPv4, since that is what goes on the wire. Zones are
// ignored: the lock matches addresses and ports, not interfaces.
type Tuple struct {
	Local, Remote netip.AddrPort
}

// String returns "local->remote", such as "198.18.0.2:80->198.18.0.1:40000".
func (t Tuple) String() string {
	return t.Local.String() + "->" + t.Remote.String()
}

// normalize returns the tuple with IPv4-mapped addresses unmapped and zones
// dropped, and whether it names a TCP connection: both endpoints valid,
// specified, of one family, with non-zero ports.
func (t Tuple) normalize() (Tuple, bool) {
	l := netip.AddrPortFrom(t.Local.Addr().Unmap().WithZone(""), t.Local.Port())
	r := netip.AddrPortFrom(t.Remote.Addr().Unmap().WithZone(""), t.Remote.Port())
	n := Tuple{Local: l, Remote: r}
	for _, ap := range []netip.AddrPort{l, r} {
		if !ap.Addr().IsValid() || ap.Addr().IsUnspecified() || ap.Port() == 0 {
			return n, false
		}
	}
	return n, l.Addr().Is4() == r.Addr().Is4()
}

// pair is an unordered connection: the two endpoints of a normalized Tuple
// in a fixed order (a <= b). A tuple and its mirror (local and remote
// swapped, which is the same connection seen from its other end, as when
// both ends live on one host) share one pair and therefore the same two set
// elements.
type pair struct {
	a, b netip.AddrPort
}

// Sides of a pair that a Lock holds: the tuple a->b, the tuple b->a, or
// both. A self-connected socket (a == b) is both at once.
const (
	sideAB uint8 = 1 << iota
	sideBA
)

// pairOf returns the pair of a normalized tuple and the side the tuple is.
func pairOf(t Tuple) (pair, uint8) {
	switch c := t.Local.Compare(t.Remote); {
	case c < 0:
		return pair{t.Local, t.Remote}, sideAB
	case c > 0:
		return pair{t.Remote, t.Local}, sideBA
	default:
		return pair{t.Local, t.Remote}, sideAB | sideBA
	}
}

// tuples returns the tuples of p that sides names.
func (p pair) tuples(sides uint8) []Tuple {
	var ts []Tuple
	if sides&sideAB != 0 {
		ts = append(ts, Tuple{Local: p.a, Remote: p.b})
	}
	if sides&sideBA != 0 && p.a != p.b {
		ts = append(ts, Tuple{Local: p.b, Remote: p.a})
	}
	return ts
}

func (p pair) is4() bool { return p.a.Addr().Is4() }

// Key lengths of the two sets: address . port . address . port, each port
// padded to a 4-byte register as nftables concatenations are.
const (
	keyLen4 = 4 + 4 + 4 + 4
	keyLen6 = 16 + 4 + 16 + 4
)

// appendKeys appends the set keys of p to dst: source·sport·destination·dport
// for the packets a->b and b->a, one key only when a == b. Each connection
// thus matches in both directions: the ingress key (remote·rport·local·lport)
// and the egress key (local·lport·remote·rport) are the two keys of its pair.
func (p pair) appendKeys(dst []byte) []byte {
	dst = appendKey(dst, p.a, p.b)
	if p.a != p.b {
		dst = appendKey(dst, p.b, p.a)
	}
	return dst
}

func appendKey(dst []byte, src, dstAP netip.AddrPort) []byte {
	dst = append(dst, src.Addr().AsSlice()...)
	dst = binary.BigEndian.AppendUint16(dst, src.Port())
	dst = append(dst, 0, 0)
	dst = append(dst, dstAP.Addr().AsSlice()...)
	dst = binary.BigEndian.AppendUint16(dst, dstAP.Port())
	return append(dst, 0, 0)
}
