package activation

import (
	"errors"
	"net/netip"
	"regexp"
	"strings"
	"testing"
)

var safeName = regexp.MustCompile(`^[A-Za-z0-9._-]{1,255}$`)

func TestNameRoundTrip(t *testing.T) {
	for _, c := range []struct{ local, remote, want string }{
		{"198.18.0.10:80", "198.18.0.1:5000", "tcp4-198.18.0.10_80-198.18.0.1_5000"},
		{"[fd00::10]:80", "[fd00::1]:5000", "tcp6-fd00..10_80-fd00..1_5000"},
		{"[::ffff:198.18.0.10]:80", "[::ffff:198.18.0.1]:5000", "tcp6-..ffff.c612.a_80-..ffff.c612.1_5000"},
		{"[fe80::1%eth0]:22", "[fe80::2%eth0]:4000", "tcp6-fe80..1_22_65746830-fe80..2_4000_65746830"},
		{"[fe80::1%veth-a_1.2:x]:22", "[fe80::2]:4000", "tcp6-fe80..1_22_766574682d615f312e323a78-fe80..2_4000"},
		{"[::]:0", "[::1]:65535", "tcp6-.._0-..1_65535"},
		{"[2001:db8::1:0:0:1]:1", "[2001:db8:0:0:1::1]:2", "tcp6-2001.db8..1.0.0.1_1-2001.db8..1.0.0.1_2"},
		{"0.0.0.0:1", "255.255.255.255:2", "tcp4-0.0.0.0_1-255.255.255.255_2"},
	} {
		l, r := netip.MustParseAddrPort(c.local), netip.MustParseAddrPort(c.remote)
		name, err := Name(l, r)
		if err != nil || name != c.want {
			t.Errorf("Name(%v, %v) = %q, %v; want %q", l, r, name, err, c.want)
			continue
		}
		if !safeName.MatchString(name) {
			t.Errorf("%q has characters or a length systemd refuses", name)
		}
		gl, gr, err := ParseName(name)
		if err != nil || gl != l || gr != r {
			t.Errorf("ParseName(%q) = %v, %v, %v; want %v, %v", name, gl, gr, err, l, r)
		}
	}
}

func TestNameRefuses(t *testing.T) {
	v4 := netip.MustParseAddrPort("198.18.0.10:80")
	v6 := netip.MustParseAddrPort("[fd00::1]:80")
	long := netip.AddrPortFrom(netip.MustParseAddr("fe80::1").WithZone(strings.Repeat("z", 64)), 1)
	for _, c := range []struct {
		l, r netip.AddrPort
		text string
	}{
		{v4, netip.AddrPort{}, "both addresses"},
		{v4, v6, "different families"},
		{long, long, "at most 255"},
	} {
		if _, err := Name(c.l, c.r); !errors.Is(err, ErrName) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("Name(%v, %v): %v, want ErrName saying %q", c.l, c.r, err, c.text)
		}
	}
}

func TestParseNameRefuses(t *testing.T) {
	for _, c := range []struct{ name, text string }{
		{"", "starts with neither"},
		{"tcp-198.18.0.10:80-198.18.0.1:5000", "starts with neither"},
		{"tcp4-198.18.0.10_80", "two endpoints"},
		{"tcp4-198.18.0.10_80-198.18.0.1_5000-x", "two endpoints"},
		{"tcp4-198.18.0.10-198.18.0.1_5000", "not address_port"},
		{"tcp4-198.18.0.10_80_65746830-198.18.0.1_5000", "not address_port"},
		{"tcp4-fd00..1_80-198.18.0.1_5000", "no valid IPv4"},
		{"tcp6-198.18.0.10_80-fd00..1_5000", "no valid IPv6"},
		{"tcp6-fd00::1_80-fd00..1_5000", "contains ':'"},
		{"tcp4-198.18.0.10_65536-198.18.0.1_5000", "no valid port"},
		{"tcp4-198.18.0.10_-1-198.18.0.1_5000", "two endpoints"},
		{"tcp6-fe80..1_80_6-fe80..2_1", "no valid hex zone"},
		{"tcp6-fe80..1_80_-fe80..2_1", "no valid hex zone"},
		{"tcp4-198.18.0.10_080-198.18.0.1_5000", "canonical"},
		{"tcp6-FD00..1_80-fd00..1_5000", "canonical"},
		{"tcp6-fd00.0.0.0.0.0.0.1_80-fd00..1_5000", "canonical"},
		{"tcp6-fe80..1_80_65544830-fe80..2_1", ""},        // upper-case zone bytes are fine …
		{"tcp6-fe80..1_80_6574FF-fe80..2_1", "canonical"}, // … upper-case hex is not
	} {
		_, _, err := ParseName(c.name)
		if c.text == "" {
			if err != nil {
				t.Errorf("ParseName(%q): %v", c.name, err)
			}
			continue
		}
		if !errors.Is(err, ErrName) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("ParseName(%q): %v, want ErrName saying %q", c.name, err, c.text)
		}
	}
}
