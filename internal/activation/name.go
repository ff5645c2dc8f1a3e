package activation

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Sentinel errors. Callers test for them with errors.Is.
var (
	// ErrInvalid means an argument of Command cannot be used.
	ErrInvalid = errors.New("activation: invalid argument")
	// ErrName means a descriptor name is not one Name produces (ParseName),
	// or addresses cannot be named (Name).
	ErrName = errors.New("activation: invalid descriptor name")
	// ErrEnv means the LISTEN_* environment is malformed or names
	// descriptors that are not open.
	ErrEnv = errors.New("activation: malformed LISTEN_* environment")
)

// MaxNameLen is the longest descriptor name systemd accepts (FDNAME_MAX).
const MaxNameLen = 255

// Name returns the descriptor name of a TCP connection from local to remote.
//
// LISTEN_FDNAMES separates names with ':' and systemd accepts only short
// names of printable characters, so addresses are encoded with the
// characters [A-Za-z0-9._-] only:
//
//	name     = ("tcp4-" | "tcp6-") endpoint "-" endpoint      (local, then remote)
//	endpoint = address "_" port [ "_" zone ]
//	address  = IPv4 dotted quad                                (tcp4)
//	         | IPv6 in RFC 5952 form with every ':' written '.' (tcp6)
//	port     = decimal, no leading zeros
//	zone     = the IPv6 zone's bytes in lowercase hex
//
// For example:
//
//	198.18.0.10:80 → 198.18.0.1:5000           tcp4-198.18.0.10_80-198.18.0.1_5000
//	[fd00::10]:80 → [fd00::1]:5000             tcp6-fd00..10_80-fd00..1_5000
//	[::ffff:198.18.0.10]:80 → …                tcp6-..ffff.c612.a_80-..ffff.c612.1_5000
//	[fe80::1%eth0]:22 → [fe80::2%eth0]:4000    tcp6-fe80..1_22_65746830-fe80..2_4000_65746830
//
// An IPv4-mapped address keeps family 6 and is written in hex groups (never
// as a dotted quad), so every '.' of a tcp6 name stands for ':'. Both
// addresses must be of the same family; the result must fit in MaxNameLen.
func Name(local, remote netip.AddrPort) (string, error) {
	if !local.IsValid() || !remote.IsValid() {
		return "", fmt.Errorf("%w: %v -> %v: both addresses are needed", ErrName, local, remote)
	}
	if local.Addr().Is4() != remote.Addr().Is4() {
		return "", fmt.Errorf("%w: %v -> %v: the addresses are of different families", ErrName, local, remote)
	}
	var b strings.Builder
	if local.Addr().Is4() {
		b.WriteString("tcp4-")
	} else {
		b.WriteString("tcp6-")
	}
	appendEndpoint(&b, local)
	b.WriteByte('-')
	appendEndpoint(&b, remote)
	if b.Len() > MaxNameLen {
		return "", fmt.Errorf("%w: %v -> %v: the name would be %d bytes, at most %d allowed", ErrName, local, remote, b.Len(), MaxNameLen)
	}
	return b.String(), nil
}

func appendEndpoint(b *strings.Builder, ap netip.AddrPort) {
	a := ap.Addr()
	if a.Is4() {
		b.WriteString(a.String())
	} else {
		b.WriteString(strings.ReplaceAll(ipv6Text(a.WithZone("")), ":", "."))
	}
	b.WriteByte('_')
	b.WriteString(strconv.Itoa(int(ap.Port())))
	if z := a.Zone(); z != "" {
		b.WriteByte('_')
		b.WriteString(hex.EncodeToString([]byte(z)))
	}
}

// ipv6Text is the RFC 5952 text of an IPv6 address, except that an
// IPv4-mapped address ends in two hex groups rather than a dotted quad.
func ipv6Text(a netip.Addr) string {
	if !a.Is4In6() {
		return a.String()
	}
	b := a.As16()
	return fmt.Sprintf("::ffff:%x:%x", uint16(b[12])<<8|uint16(b[13]), uint16(b[14])<<8|uint16(b[15]))
}

// ParseName decodes a name made by Name back into the connection's
// addresses. It accepts exactly what Name produces: anything else, even an
// equivalent spelling, wraps ErrName.
func ParseName(name string) (local, remote netip.AddrPort, err error) {
	fail := func(why string) (netip.AddrPort, netip.AddrPort, error) {
		return netip.AddrPort{}, netip.AddrPort{}, fmt.Errorf("%w: %q: %s", ErrName, name, why)
	}
	var v6 bool
	family := "IPv4"
	switch {
	case strings.HasPrefix(name, "tcp4-"):
	case strings.HasPrefix(name, "tcp6-"):
		v6, family = true, "IPv6"
	default:
		return fail(`it starts with neither "tcp4-" nor "tcp6-"`)
	}
	eps := strings.Split(name[len("tcp4-"):], "-")
	if len(eps) != 2 {
		return fail("it has not exactly two endpoints")
	}
	var aps [2]netip.AddrPort
	for i, ep := range eps {
		f := strings.Split(ep, "_")
		if len(f) != 2 && (len(f) != 3 || !v6) {
			return fail(fmt.Sprintf("endpoint %q is not address_port (or, for IPv6, address_port_zone)", ep))
		}
		text := f[0]
		if v6 {
			if strings.Contains(text, ":") {
				return fail("it contains ':'")
			}
			text = strings.ReplaceAll(text, ".", ":")
		}
		a, err := netip.ParseAddr(text)
		if err != nil || a.Is4() == v6 || a.Zone() != "" {
			return fail(fmt.Sprintf("endpoint %q has no valid %s address", ep, family))
		}
		port, err := strconv.ParseUint(f[1], 10, 16)
		if err != nil {
			return fail(fmt.Sprintf("endpoint %q has no valid port", ep))
		}
		if len(f) == 3 {
			z, err := hex.DecodeString(f[2])
			if err != nil || len(z) == 0 {
				return fail(fmt.Sprintf("endpoint %q has no valid hex zone", ep))
			}
			a = a.WithZone(string(z))
		}
		aps[i] = netip.AddrPortFrom(a, uint16(port))
	}
	// One spelling per connection: leading zeros, upper-case hex and
	// uncompressed IPv6 are refused.
	if canon, err := Name(aps[0], aps[1]); err != nil || canon != name {
		return fail(fmt.Sprintf("it is not in canonical form (%q)", canon))
	}
	return aps[0], aps[1], nil
}

// ValidName reports whether systemd and this package accept name in
// LISTEN_FDNAMES: 1 to MaxNameLen bytes of [A-Za-z0-9._-].
func ValidName(name string) bool {
	if len(name) == 0 || len(name) > MaxNameLen {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}
