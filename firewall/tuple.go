package firewall

import (
	"bytes"
	"cmp"
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

// endpoint is an address and port in a compact, pointer-free form that
// hashes and compares fast; IPv4 addresses are stored IPv4-mapped.
type endpoint struct {
	addr [16]byte
	port uint16
}

func endpointOf(ap netip.AddrPort) endpoint {
	return endpoint{addr: ap.Addr().As16(), port: ap.Port()}
}

func (e endpoint) compare(o endpoint) int {
	if c := bytes.Compare(e.addr[:], o.addr[:]); c != 0 {
		return c
	}
	return cmp.Compare(e.port, o.port)
}

// pair is an unordered connection: the two endpoints of a normalized Tuple
// in a fixed order (a <= b). A tuple and its mirror (local and remote
// swapped, which is the same connection seen from its other end, as when
// both ends live on one host) share one pair and therefore the same two set
// elements.
type pair struct {
	a, b endpoint
	v4   bool
}

// Sides of a pair that a Lock holds: the tuple a->b, the tuple b->a, or
// both. A self-connected socket (a == b) is both at once.
const (
	sideAB uint8 = 1 << iota
	sideBA
)

// pairOf returns the pair of a normalized tuple and the side the tuple is.
func pairOf(t Tuple) (pair, uint8) {
	l, r := endpointOf(t.Local), endpointOf(t.Remote)
	v4 := t.Local.Addr().Is4()
	switch c := l.compare(r); {
	case c < 0:
		return pair{l, r, v4}, sideAB
	case c > 0:
		return pair{r, l, v4}, sideBA
	default:
		return pair{l, r, v4}, sideAB | sideBA
	}
}

func (p pair) addrPort(e endpoint) netip.AddrPort {
	a := netip.AddrFrom16(e.addr)
	if p.v4 {
		a = a.Unmap()
	}
	return netip.AddrPortFrom(a, e.port)
}

// tuples returns the tuples of p that sides names.
func (p pair) tuples(sides uint8) []Tuple {
	var ts []Tuple
	if sides&sideAB != 0 {
		ts = append(ts, Tuple{Local: p.addrPort(p.a), Remote: p.addrPort(p.b)})
	}
	if sides&sideBA != 0 && p.a != p.b {
		ts = append(ts, Tuple{Local: p.addrPort(p.b), Remote: p.addrPort(p.a)})
	}
	return ts
}

func (p pair) is4() bool { return p.v4 }

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
	dst = p.appendKey(dst, p.a, p.b)
	if p.a != p.b {
		dst = p.appendKey(dst, p.b, p.a)
	}
	return dst
}

func (p pair) appendKey(dst []byte, src, to endpoint) []byte {
	from := 0
	if p.v4 {
		from = 12
	}
	dst = append(dst, src.addr[from:]...)
	dst = append(dst, byte(src.port>>8), byte(src.port), 0, 0)
	dst = append(dst, to.addr[from:]...)
	return append(dst, byte(to.port>>8), byte(to.port), 0, 0)
}

// pairSides is one pair of a call and the sides the call names.
type pairSides struct {
	p     pair
	sides uint8
}

// collect normalizes ts into distinct pairs, in first-seen order, or fails
// with ErrInvalidTuple naming every bad tuple.
func collect(op, table string, ts []Tuple) ([]pairSides, error) {
	var bad []Tuple
	idx := make(map[pair]int, len(ts))
	pairs := make([]pairSides, 0, len(ts))
	for _, t := range ts {
		n, ok := t.normalize()
		if !ok {
			bad = append(bad, t)
			continue
		}
		p, s := pairOf(n)
		if i, ok := idx[p]; ok {
			pairs[i].sides |= s
			continue
		}
		idx[p] = len(pairs)
		pairs = append(pairs, pairSides{p, s})
	}
	if bad != nil {
		return nil, &Error{Op: op, Table: table, Tuples: bad, Err: ErrInvalidTuple}
	}
	return pairs, nil
}
