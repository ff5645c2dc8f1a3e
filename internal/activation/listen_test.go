package activation

import (
	"errors"
	"net/netip"
	"testing"
)

func TestListenerAndPendingNames(t *testing.T) {
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		listener, local, remote string
		lname, pname            string
	}{
		{"198.18.0.10:80", "198.18.0.10:80", "198.18.0.1:5000",
			"listen4-198.18.0.10_80", "pending4-198.18.0.10_80-198.18.0.10_80-198.18.0.1_5000"},
		{"0.0.0.0:80", "198.18.0.10:80", "198.18.0.1:5000",
			"listen4-0.0.0.0_80", "pending4-0.0.0.0_80-198.18.0.10_80-198.18.0.1_5000"},
		{"[::]:443", "[::ffff:198.18.0.10]:443", "[::ffff:198.18.0.1]:5000",
			"listen6-.._443", "pending6-.._443-..ffff.c612.a_443-..ffff.c612.1_5000"},
		// An IPv6 socket bound to an IPv4-mapped address is of family 6.
		{"[::ffff:198.18.0.10]:443", "[::ffff:198.18.0.10]:443", "[::ffff:198.18.0.1]:5000",
			"listen6-..ffff.c612.a_443", "pending6-..ffff.c612.a_443-..ffff.c612.a_443-..ffff.c612.1_5000"},
		{"[fd00::10]:443", "[fd00::10]:443", "[fd00::1]:5000",
			"listen6-fd00..10_443", "pending6-fd00..10_443-fd00..10_443-fd00..1_5000"},
	} {
		ln, err := ListenerName(ap(tc.listener))
		if err != nil || ln != tc.lname || !ValidName(ln) {
			t.Errorf("ListenerName(%s) = %q, %v; want %q", tc.listener, ln, err, tc.lname)
		}
		pn, err := PendingName(ap(tc.listener), ap(tc.local), ap(tc.remote))
		if err != nil || pn != tc.pname || !ValidName(pn) {
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
	if _, err := ListenerName(netip.AddrPort{}); !errors.Is(err, ErrName) {
		t.Errorf("listener without an address: %v", err)
	}
}
