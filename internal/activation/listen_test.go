package activation

import (
	"errors"
	"net/netip"
	"testing"
)

func TestListenerAndPendingNames(t *testing.T) {
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		v4                      bool
		listener, local, remote string
		lname, pname            string
	}{
		{true, "198.18.0.10:80", "198.18.0.10:80", "198.18.0.1:5000",
			"listen4-198.18.0.10_80", "pending4-198.18.0.10_80-198.18.0.10_80-198.18.0.1_5000"},
		{true, "0.0.0.0:80", "198.18.0.10:80", "198.18.0.1:5000",
			"listen4-0.0.0.0_80", "pending4-0.0.0.0_80-198.18.0.10_80-198.18.0.1_5000"},
		{false, "[::]:443", "[::ffff:198.18.0.10]:443", "[::ffff:198.18.0.1]:5000",
			"listen6-.._443", "pending6-.._443-..ffff.c612.a_443-..ffff.c612.1_5000"},
		{false, "[fd00::10]:443", "[fd00::10]:443", "[fd00::1]:5000",
			"listen6-fd00..10_443", "pending6-fd00..10_443-fd00..10_443-fd00..1_5000"},
	} {
		ln, err := ListenerName(tc.v4, ap(tc.listener))
		if err != nil || ln != tc.lname || !validName(ln) {
			t.Errorf("ListenerName(%s) = %q, %v; want %q", tc.listener, ln, err, tc.lname)
		}
		pn, err := PendingName(ap(tc.listener), ap(tc.local), ap(tc.remote))
		if err != nil || pn != tc.pname || !validName(pn) {
			t.Errorf("PendingName = %q, %v; want %q", pn, err, tc.pname)
			continue
		}
		l, lo, r, err := ParsePendingName(pn)
		if err != nil || l != ap(tc.listener) || lo != ap(tc.local) || r != ap(tc.remote) {
			t.Errorf("ParsePendingName(%q) = %v %v %v, %v", pn, l, lo, r, err)
		}
	}
	for _, bad := range []string{"pending4-198.18.0.10_80", "tcp4-1.2.3.4_1-1.2.3.4_2", "pending4-x_1-1.2.3.4_1-1.2.3.4_2",
		"pending6-198.18.0.10_80-198.18.0.10_80-198.18.0.1_5000"} {
		if _, _, _, err := ParsePendingName(bad); !errors.Is(err, ErrName) {
			t.Errorf("ParsePendingName(%q): %v, want ErrName", bad, err)
		}
	}
	if _, err := ListenerName(true, ap("[fd00::1]:80")); !errors.Is(err, ErrName) {
		t.Errorf("IPv6 address for an IPv4 listener: %v", err)
	}
}
