package lab

import (
	"net/netip"
	"os"
	"testing"
)

// Require skips the test when the process cannot build namespaces (not
// root), and fails it instead under CI (CI=true), where nothing may skip.
// It also sweeps namespaces left by dead test processes.
func Require(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		Skip(tb, "needs root: network namespaces, TCP_REPAIR and nftables")
	}
	if err := Sweep(); err != nil {
		tb.Logf("lab: sweep of stale namespaces: %v", err)
	}
}

// Skip skips the test for the reason why, and fails it instead under CI
// (CI=true), where nothing may skip.
func Skip(tb testing.TB, why string) {
	tb.Helper()
	if os.Getenv("CI") == "true" {
		tb.Fatal(why + ", and CI=true forbids skipping")
	}
	tb.Skip(why)
}

// NewTestLAN builds a LAN for a test and removes it when the test ends.
func NewTestLAN(tb testing.TB, labels ...string) *LAN {
	tb.Helper()
	Require(tb)
	l, err := NewLAN(labels...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := l.Close(); err != nil {
			tb.Errorf("lab: remove LAN: %v", err)
		}
	})
	return l
}

// NewTestNS builds a lone namespace for a test (NewNS), puts each of lo on
// its loopback as a host address (/32, /128), and removes it when the test
// ends.
func NewTestNS(tb testing.TB, label string, lo ...netip.Addr) *NS {
	tb.Helper()
	Require(tb)
	ns, err := NewNS(label)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := ns.Close(); err != nil {
			tb.Errorf("lab: remove namespace: %v", err)
		}
	})
	for _, a := range lo {
		args := []string{"addr", "add", netip.PrefixFrom(a, a.BitLen()).String(), "dev", "lo"}
		if a.Is6() {
			args = append(args, "nodad")
		}
		if err := ns.IP(args...); err != nil {
			tb.Fatal(err)
		}
	}
	return ns
}
