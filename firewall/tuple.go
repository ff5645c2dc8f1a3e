package firewall

import "net/netip"

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

func (e endpoint) addrPort(v4 bool) netip.AddrPort {
	a := netip.AddrFrom16(e.addr)
	if v4 {
		a = a.Unmap()
	}
	return netip.AddrPortFrom(a, e.port)
}

// conn is a normalized Tuple in compact form: the key of the Lock's
// bookkeeping and of exactly one set element. A tuple and its mirror (local
// and remote swapped: the same connection seen from its other end, as when
// both ends live on one host) are two conns and two elements; a
// self-connected socket, its own mirror, is one.
type conn struct {
	local, remote endpoint
	v4            bool
}

// tuple returns the normalized tuple of c.
func (c conn) tuple() Tuple {
	return Tuple{Local: c.local.addrPort(c.v4), Remote: c.remote.addrPort(c.v4)}
}

// Key lengths of the two sets: address . port . address . port, each port
// padded to a 4-byte register as nftables concatenations are.
const (
	keyLen4 = 4 + 4 + 4 + 4
	keyLen6 = 16 + 4 + 16 + 4
)

// appendKey appends the set key of c to dst: local·lport·remote·rport,
// addresses and ports in network order. It is the packet's
// saddr·sport·daddr·dport when the packet leaves the local end, and its
// daddr·dport·saddr·sport when it comes to the local end; the rules look up
// both orders.
func (c conn) appendKey(dst []byte) []byte {
	from := 0
	if c.v4 {
		from = 12
	}
	dst = append(dst, c.local.addr[from:]...)
	dst = append(dst, byte(c.local.port>>8), byte(c.local.port), 0, 0)
	dst = append(dst, c.remote.addr[from:]...)
	return append(dst, byte(c.remote.port>>8), byte(c.remote.port), 0, 0)
}

// collect normalizes ts into conns, in order, duplicates included, or fails
// with ErrInvalidTuple naming every bad tuple.
func collect(op, table string, ts []Tuple) ([]conn, error) {
	cs := make([]conn, len(ts))
	ok := true
	for i := range ts {
		ok = cs[i].set(&ts[i]) && ok
	}
	if ok {
		return cs, nil
	}
	var bad []Tuple
	for _, t := range ts {
		if _, ok := t.normalize(); !ok {
			bad = append(bad, t)
		}
	}
	return nil, &Error{Op: op, Table: table, Tuples: bad, Err: ErrInvalidTuple}
}

// set makes c the conn of t.normalize() and returns whether t is valid,
// without building the normalized tuple (As16 already maps IPv4 addresses
// and drops zones); filling c in place is several times faster than
// returning it.
func (c *conn) set(t *Tuple) bool {
	la, ra := t.Local.Addr(), t.Remote.Addr()
	c.local.addr, c.local.port = la.As16(), t.Local.Port()
	c.remote.addr, c.remote.port = ra.As16(), t.Remote.Port()
	c.v4 = la.Is4() || la.Is4In6()
	return la.IsValid() && ra.IsValid() && c.v4 == (ra.Is4() || ra.Is4In6()) &&
		c.local.specified(c.v4) && c.remote.specified(c.v4)
}

// specified reports whether e has a port and an address other than the
// unspecified one of its family.
func (e *endpoint) specified(v4 bool) bool {
	if e.port == 0 {
		return false
	}
	if v4 {
		return e.addr[12]|e.addr[13]|e.addr[14]|e.addr[15] != 0
	}
	return e.addr != [16]byte{}
}
