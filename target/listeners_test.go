package target

import (
	"errors"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// TestCheckListener applies the policy to listeners: allowed addresses and
// ports, the unspecified address only when every address it takes is
// allowed (a dual-stack [::] takes every IPv4 address too), never the
// bypass mark, pending indices within the count.
func TestCheckListener(t *testing.T) {
	pol := Policy{Allow: []netip.Prefix{netip.MustParsePrefix("198.18.0.10/32"), netip.MustParsePrefix("fd00::/64")}, AllowPorts: []uint16{80}}
	spec := func(local string, mut ...func(*transport.ListenerSpec)) *transport.ListenerSpec {
		ap := netip.MustParseAddrPort(local)
		fam := uint16(unix.AF_INET6)
		if ap.Addr().Is4() {
			fam = unix.AF_INET
		}
		s := &transport.ListenerSpec{Listener: repair.Listener{Family: fam, Local: ap, Backlog: 10}, Pending: []uint32{0, 2}}
		for _, m := range mut {
			m(s)
		}
		return s
	}
	v6only := func(s *transport.ListenerSpec) { s.Listener.V6Only = true }
	for _, tc := range []struct {
		name string
		pol  Policy
		s    *transport.ListenerSpec
		code transport.VerdictCode // 0: allowed
	}{
		{"allowed v4", pol, spec("198.18.0.10:80"), 0},
		{"allowed v6", pol, spec("[fd00::10]:80"), 0},
		{"allowed mapped", pol, spec("[::ffff:198.18.0.10]:80"), 0},
		{"address", pol, spec("198.18.0.11:80"), transport.VerdictRefused},
		{"port", pol, spec("198.18.0.10:81"), transport.VerdictRefused},
		{"wildcard v4", pol, spec("0.0.0.0:80"), transport.VerdictRefused},
		{"wildcard v6", pol, spec("[::]:80"), transport.VerdictRefused},
		{"wildcard v6only allowed", Policy{Allow: []netip.Prefix{netip.MustParsePrefix("::/0")}}, spec("[::]:80", v6only), 0},
		{"wildcard dual-stack needs 0.0.0.0/0 too", Policy{Allow: []netip.Prefix{netip.MustParsePrefix("::/0")}}, spec("[::]:80"), transport.VerdictRefused},
		{"wildcard dual-stack needs ::/0 too", Policy{Allow: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}}, spec("[::]:80"), transport.VerdictRefused},
		{"wildcard dual-stack allowed", Policy{Allow: []netip.Prefix{netip.MustParsePrefix("::/0"), netip.MustParsePrefix("0.0.0.0/0")}}, spec("[::]:80"), 0},
		{"wildcard dual-stack allowed (mapped)", Policy{Allow: []netip.Prefix{netip.MustParsePrefix("::/0"), netip.MustParsePrefix("::ffff:0.0.0.0/96")}}, spec("[::]:80"), 0},
		{"wildcard mapped v4 needs 0.0.0.0/0", Policy{Allow: []netip.Prefix{netip.MustParsePrefix("::/0")}}, spec("[::ffff:0.0.0.0]:80", v6only), transport.VerdictRefused},
		{"wildcard v4 needs 0.0.0.0/0", Policy{Allow: []netip.Prefix{netip.MustParsePrefix("::/0")}}, spec("0.0.0.0:80"), transport.VerdictRefused},
		{"bypass mark", pol, spec("198.18.0.10:80", func(s *transport.ListenerSpec) { s.Listener.Mark = firewall.DefaultBypassMark }), transport.VerdictRefused},
		{"pending index", pol, spec("198.18.0.10:80", func(s *transport.ListenerSpec) { s.Pending = []uint32{3} }), transport.VerdictInvalid},
	} {
		err := tc.pol.checkListener(tc.s, 3)
		var r *Refusal
		switch {
		case tc.code == 0 && err != nil:
			t.Errorf("%s: refused: %v", tc.name, err)
		case tc.code != 0 && (!errors.As(err, &r) || r.Code != tc.code):
			t.Errorf("%s: %v, want verdict %v", tc.name, err, tc.code)
		}
	}
}
