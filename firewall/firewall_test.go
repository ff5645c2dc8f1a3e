package firewall

import (
	"bytes"
	"errors"
	"go/parser"
	"go/token"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// connOf returns the conn of a normalized tuple, built the plain way: the
// reference conn.set is checked against (TestConnSet).
func connOf(t Tuple) conn {
	return conn{local: endpointOf(t.Local), remote: endpointOf(t.Remote), v4: t.Local.Addr().Is4()}
}

func endpointOf(e netip.AddrPort) endpoint {
	return endpoint{addr: e.Addr().As16(), port: e.Port()}
}

// TestConstants pins the names and values other processes and other hosts
// rely on: changing one breaks sweeping, crafted packets or docs.
func TestConstants(t *testing.T) {
	if TablePrefix != "tcpmigrate_" || DefaultBypassMark != 0x746d || Priority != -300 ||
		chainIn != "in" || chainOut != "out" || setV4 != "v4" || setV6 != "v6" ||
		DefaultLease != 10*time.Second || MaxInstanceLen != 64 {
		t.Fatal("a pinned constant changed; update docs/firewall.md and every caller first")
	}
	if TableName("m1") != "tcpmigrate_m1" {
		t.Fatalf("TableName = %q", TableName("m1"))
	}
}

func TestNormalize(t *testing.T) {
	for _, tc := range []struct {
		in   Tuple
		want Tuple
		ok   bool
	}{
		{Tuple{ap("198.18.0.1:80"), ap("198.18.0.2:4000")}, Tuple{ap("198.18.0.1:80"), ap("198.18.0.2:4000")}, true},
		{Tuple{ap("[::ffff:198.18.0.1]:80"), ap("[::ffff:198.18.0.2]:4000")}, Tuple{ap("198.18.0.1:80"), ap("198.18.0.2:4000")}, true},
		{Tuple{ap("[::ffff:198.18.0.1]:80"), ap("198.18.0.2:4000")}, Tuple{ap("198.18.0.1:80"), ap("198.18.0.2:4000")}, true},
		{Tuple{ap("[fe80::1%eth0]:80"), ap("[fe80::2%eth0]:4000")}, Tuple{ap("[fe80::1]:80"), ap("[fe80::2]:4000")}, true},
		{Tuple{ap("[fd00::1]:80"), ap("[fd00::2]:4000")}, Tuple{ap("[fd00::1]:80"), ap("[fd00::2]:4000")}, true},
		{Tuple{ap("[fd00::1]:80"), ap("198.18.0.2:4000")}, Tuple{}, false},
		{Tuple{ap("198.18.0.1:0"), ap("198.18.0.2:4000")}, Tuple{}, false},
		{Tuple{ap("0.0.0.0:80"), ap("198.18.0.2:4000")}, Tuple{}, false},
		{Tuple{ap("198.18.0.1:80"), ap("[::]:4000")}, Tuple{}, false},
		{Tuple{}, Tuple{}, false},
	} {
		got, ok := tc.in.normalize()
		if ok != tc.ok || ok && got != tc.want {
			t.Errorf("normalize(%v) = %v, %v; want %v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

// TestKeys checks the element encoding: one key per tuple,
// local·lport·remote·rport, addresses and ports in network order, ports
// padded to four bytes; a tuple and its mirror are two keys, a
// self-connected tuple its own mirror.
func TestKeys(t *testing.T) {
	tu := Tuple{Local: ap("198.18.0.2:80"), Remote: ap("198.18.0.1:40000")}
	c := connOf(tu)
	got := c.appendKey(nil)
	want := []byte{198, 18, 0, 2, 0, 80, 0, 0, 198, 18, 0, 1, 0x9c, 0x40, 0, 0}
	if !bytes.Equal(got, want) || len(got) != keyLen4 {
		t.Fatalf("key\n got %x\nwant %x", got, want)
	}
	mirror := connOf(Tuple{Local: tu.Remote, Remote: tu.Local})
	if mirror == c || !bytes.Equal(mirror.appendKey(nil), append(want[8:16:16], want[:8]...)) {
		t.Fatalf("mirror key %x", mirror.appendKey(nil))
	}
	if c.tuple() != tu || mirror.tuple() != (Tuple{Local: tu.Remote, Remote: tu.Local}) {
		t.Fatalf("round trip: %v, %v", c.tuple(), mirror.tuple())
	}
	t6 := Tuple{Local: ap("[fd00::2]:80"), Remote: ap("[fd00::1]:40000")}
	k := connOf(t6).appendKey(nil)
	want6 := append(append(netip.MustParseAddr("fd00::2").AsSlice(), 0, 80, 0, 0),
		append(netip.MustParseAddr("fd00::1").AsSlice(), 0x9c, 0x40, 0, 0)...)
	if !bytes.Equal(k, want6) || len(k) != keyLen6 || connOf(t6).tuple() != t6 {
		t.Fatalf("v6 key\n got %x\nwant %x", k, want6)
	}
	self := connOf(Tuple{Local: ap("198.18.0.1:5000"), Remote: ap("198.18.0.1:5000")})
	if self != connOf(Tuple{Local: self.tuple().Remote, Remote: self.tuple().Local}) {
		t.Fatal("a self-connected tuple differs from its mirror")
	}
}

func TestCollect(t *testing.T) {
	a := Tuple{Local: ap("198.18.0.2:80"), Remote: ap("198.18.0.1:40000")}
	mirror := Tuple{Local: a.Remote, Remote: a.Local}
	mapped := Tuple{Local: ap("[::ffff:198.18.0.2]:80"), Remote: ap("[::ffff:198.18.0.1]:40000")}
	cs, err := collect("lock", "t", []Tuple{a, mapped, mirror})
	if err != nil || len(cs) != 3 || cs[0] != cs[1] || cs[0] == cs[2] || !cs[1].v4 || cs[2] != connOf(mirror) {
		t.Fatalf("collect = %v, %v", cs, err)
	}
	bad := Tuple{Local: ap("198.18.0.2:0"), Remote: a.Remote}
	_, err = collect("lock", "tcpmigrate_t", []Tuple{a, bad})
	var fe *Error
	if !errors.Is(err, ErrInvalidTuple) || !errors.As(err, &fe) || len(fe.Tuples) != 1 || fe.Tuples[0] != bad {
		t.Fatalf("collect with a bad tuple: %v", err)
	}
	if want := "firewall: lock tcpmigrate_t: 198.18.0.2:0->198.18.0.1:40000: invalid tuple"; err.Error() != want {
		t.Fatalf("error text %q, want %q", err.Error(), want)
	}
}

func TestErrorText(t *testing.T) {
	var ts []Tuple
	for i := range 5 {
		ts = append(ts, Tuple{Local: ap("198.18.0.2:80"), Remote: netip.AddrPortFrom(netip.MustParseAddr("198.18.0.1"), uint16(1000+i))})
	}
	err := &Error{Op: "renew", Table: "tcpmigrate_x", Tuples: ts, Err: ErrLeaseLapsed}
	want := "firewall: renew tcpmigrate_x: 198.18.0.2:80->198.18.0.1:1000: 198.18.0.2:80->198.18.0.1:1001: " +
		"198.18.0.2:80->198.18.0.1:1002: (and 2 more): lease lapsed before renewal"
	if err.Error() != want {
		t.Fatalf("got  %q\nwant %q", err.Error(), want)
	}
	if !errors.Is(err, ErrLeaseLapsed) {
		t.Fatal("errors.Is(ErrLeaseLapsed) = false")
	}
	for _, s := range []error{ErrInvalidConfig, ErrInvalidTuple, ErrExists, ErrClosed, ErrNotLocked, ErrLeaseLapsed, ErrRenewerRunning, ErrNotSupported} {
		if !strings.HasPrefix(s.Error(), "firewall: ") {
			t.Errorf("sentinel %q lacks the package prefix", s)
		}
	}
}

func TestConfig(t *testing.T) {
	c, err := Config{Instance: "mig-1.a_B"}.withDefaults()
	if err != nil || c.BypassMark != DefaultBypassMark || c.Lease != DefaultLease {
		t.Fatalf("defaults: %+v, %v", c, err)
	}
	c, err = Config{Instance: "x", Lease: 2500*time.Millisecond + 7, BypassMark: 1}.withDefaults()
	if err != nil || c.Lease != 2500*time.Millisecond || c.BypassMark != 1 {
		t.Fatalf("explicit: %+v, %v", c, err)
	}
	for _, bad := range []Config{
		{},
		{Instance: strings.Repeat("a", MaxInstanceLen+1)},
		{Instance: "a/b"},
		{Instance: "a b"},
		{Instance: "x", Lease: time.Millisecond},
		{Instance: "x", Lease: -time.Second},
		{Instance: "x", Lease: MaxLease + time.Second},
		{Instance: "x", NetNS: -1},
	} {
		if _, err := bad.withDefaults(); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%+v: err = %v, want ErrInvalidConfig", bad, err)
		}
	}
}

// TestImports encodes the layering of DESIGN.md: firewall imports nothing
// of the project, and outside the standard library only x/sys and
// google/nftables. (Tests may use more, such as mdlayher/netlink to decode
// messages.)
func TestImports(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	allowed := []string{"golang.org/x/sys/", "github.com/google/nftables"}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, im := range af.Imports {
			path, _ := strconv.Unquote(im.Path.Value)
			first, _, _ := strings.Cut(path, "/")
			if !strings.Contains(first, ".") {
				continue // standard library
			}
			ok := false
			for _, a := range allowed {
				ok = ok || strings.HasPrefix(path, a)
			}
			if !ok {
				t.Errorf("%s imports %s, which the layering forbids", f, path)
			}
		}
	}
	if _, err := os.Stat("doc.go"); err != nil {
		t.Errorf("package has no doc.go: %v", err)
	}
}

// TestConnSet checks that the fast conversion agrees with normalize.
func TestConnSet(t *testing.T) {
	eps := []netip.AddrPort{
		{}, ap("198.18.0.1:80"), ap("198.18.0.1:0"), ap("0.0.0.0:80"), ap("[::ffff:198.18.0.2]:4000"),
		ap("[::ffff:0.0.0.0]:1"), ap("[fd00::1]:80"), ap("[::]:80"), ap("[fe80::1%eth0]:443"), ap("[::1]:22"),
		ap("[::ffff:198.18.0.2%eth0]:9"), netip.AddrPortFrom(netip.Addr{}, 80),
	}
	for _, l := range eps {
		for _, r := range eps {
			tu := Tuple{Local: l, Remote: r}
			n, ok := tu.normalize()
			var c conn
			cok := c.set(&tu)
			if ok != cok || ok && (c != connOf(n) || c.tuple() != n) {
				t.Errorf("%v: set = %v, %v; normalize = %v, %v", tu, c, cok, n, ok)
			}
		}
	}
}
