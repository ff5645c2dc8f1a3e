package addrmove_test

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/addrmove"
)

// TestMove is the switch phase: the peer talks to the service address on
// src, src releases it, dst claims it, and the peer's neighbour entry (never
// flushed by the test) and its next connection both go to dst.
func TestMove(t *testing.T) {
	families(t, func(t *testing.T, v6 bool) {
		h := newHosts(t, v6)
		serve(t, h.src, "src")
		serve(t, h.dst, "dst")
		srcMAC, dstMAC := mac(t, h.src), mac(t, h.dst)
		svc := h.svc.Addr()
		ctx := context.Background()

		if got := ask(t, h.peer, h.svcPort()); got != "src" {
			t.Fatalf("before the move, %s answered from %q, want src", svc, got)
		}
		waitNeighbour(t, h.peer, svc, srcMAC, "src")
		if v6 {
			// With duplicate address detection on, an address added
			// without nodad would stay tentative (unusable) for a second.
			sysctl(t, h.dst, "ipv6/conf/eth0/accept_dad", "1")
			sysctl(t, h.dst, "ipv6/conf/eth0/dad_transmits", "1")
		}

		if err := addrmove.Release(ctx, h.cfg(h.src)); err != nil {
			t.Fatal(err)
		}
		if present(t, h.cfg(h.src)) {
			t.Fatal("Present on src after Release = true")
		}
		if err := addrmove.Release(ctx, h.cfg(h.src)); err != nil {
			t.Fatalf("second Release: %v", err)
		}

		if err := addrmove.Claim(ctx, h.cfg(h.dst)); err != nil {
			t.Fatal(err)
		}
		if !present(t, h.cfg(h.dst)) {
			t.Fatal("Present on dst after Claim = false")
		}
		if v6 {
			flags, _ := addrFlags(t, h.dst, svc)
			if flags&unix.IFA_F_TENTATIVE != 0 || flags&unix.IFA_F_NODAD == 0 {
				t.Errorf("dst's %s has flags %#x; want nodad and not tentative", svc, flags)
			}
		}
		// No flush and no traffic to svc since the move: only the
		// announcement can have changed the entry.
		waitNeighbour(t, h.peer, svc, dstMAC, "dst")
		if got := ask(t, h.peer, h.svcPort()); got != "dst" {
			t.Fatalf("after the move, %s answered from %q, want dst", svc, got)
		}

		if err := addrmove.Claim(ctx, h.cfg(h.dst)); err != nil {
			t.Fatalf("second Claim: %v", err)
		}
		if _, n := addrFlags(t, h.dst, svc); n != 1 {
			t.Errorf("dst has %s configured %d times after two Claims, want once", svc, n)
		}
		if got := ask(t, h.peer, h.svcPort()); got != "dst" {
			t.Fatalf("after the second Claim, %s answered from %q, want dst", svc, got)
		}
	})
}

// TestClaimAnnouncesPresentAddress is the control of TestMove: when the
// address is moved by hand, the kernel tells the peer nothing and its entry
// keeps the old MAC; Claim of the address that is now present changes
// nothing on dst but announces it, and the entry follows.
func TestClaimAnnouncesPresentAddress(t *testing.T) {
	families(t, func(t *testing.T, v6 bool) {
		h := newHosts(t, v6)
		serve(t, h.src, "src")
		srcMAC, dstMAC := mac(t, h.src), mac(t, h.dst)
		svc := h.svc.Addr()
		if got := ask(t, h.peer, h.svcPort()); got != "src" {
			t.Fatalf("%s answered from %q, want src", svc, got)
		}
		waitNeighbour(t, h.peer, svc, srcMAC, "src")

		if err := h.src.DelAddr(h.svc); err != nil {
			t.Fatal(err)
		}
		if err := h.dst.AddAddr(h.svc); err != nil {
			t.Fatal(err)
		}
		// A negative observation cannot poll for an event: watch the
		// entry for a bounded window, far longer than an announcement
		// takes to cross the lab's bridge (TestMove sees one in
		// milliseconds), and require that it never changes.
		for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
			if n, ok := neighbour(t, h.peer, svc); !ok || n.HardwareAddr.String() != srcMAC.String() {
				t.Fatalf("the peer's entry changed without an announcement: %s (src is %s); the test cannot tell Claim's announcement from the kernel's",
					describe(n, ok), srcMAC)
			}
		}

		if err := addrmove.Claim(context.Background(), h.cfg(h.dst)); err != nil {
			t.Fatal(err)
		}
		if _, n := addrFlags(t, h.dst, svc); n != 1 {
			t.Errorf("dst has %s configured %d times, want once", svc, n)
		}
		waitNeighbour(t, h.peer, svc, dstMAC, "dst")
	})
}

// TestReleaseAbsent: releasing an address that is not there succeeds and
// leaves the device's other addresses alone.
func TestReleaseAbsent(t *testing.T) {
	families(t, func(t *testing.T, v6 bool) {
		h := newHosts(t, v6)
		cfg := h.cfg(h.dst)
		if present(t, cfg) {
			t.Fatal("Present on dst before any Claim = true")
		}
		if err := addrmove.Release(context.Background(), cfg); err != nil {
			t.Fatalf("Release of an absent address: %v", err)
		}
		own := netip.MustParseAddr("198.18.0.3")
		if v6 {
			own = netip.MustParseAddr("fd00::3")
		}
		if _, n := addrFlags(t, h.dst, own); n != 1 {
			t.Errorf("dst's own address %s is configured %d times after Release, want once", own, n)
		}
		if !present(t, h.cfg(h.src)) {
			t.Error("Release on dst removed the address from src")
		}
	})
}

// TestMissingDevice: every operation on a device that does not exist fails
// with ErrNoDevice and a message naming the operation, address and device.
func TestMissingDevice(t *testing.T) {
	h := newHosts(t, false)
	cfg := h.cfg(h.dst)
	cfg.Dev = "nosuch0"
	ctx := context.Background()
	_, presentErr := addrmove.Present(cfg)
	for op, err := range map[addrmove.Op]error{
		addrmove.OpClaim:   addrmove.Claim(ctx, cfg),
		addrmove.OpRelease: addrmove.Release(ctx, cfg),
		addrmove.OpPresent: presentErr,
	} {
		if !errors.Is(err, addrmove.ErrNoDevice) {
			t.Errorf("%s: error %v, want ErrNoDevice", op, err)
			continue
		}
		var e *addrmove.Error
		if !errors.As(err, &e) || e.Op != op || e.Dev != "nosuch0" || e.Prefix != h.svc {
			t.Errorf("%s: error %#v does not name the operation, device and address", op, e)
		}
		want := "addrmove: " + string(op) + " 198.18.0.100/24 on nosuch0: no such device"
		if err.Error() != want {
			t.Errorf("%s: message %q, want %q", op, err, want)
		}
	}
}

// TestPrefixMismatch: Claim refuses an address present with another prefix
// length, and Release removes the address whatever its length.
func TestPrefixMismatch(t *testing.T) {
	h := newHosts(t, false)
	cfg := h.cfg(h.src) // src has 198.18.0.100/24
	cfg.Prefix = netip.MustParsePrefix("198.18.0.100/25")
	ctx := context.Background()
	err := addrmove.Claim(ctx, cfg)
	if !errors.Is(err, addrmove.ErrPrefixMismatch) {
		t.Fatalf("Claim of /25 over /24: %v, want ErrPrefixMismatch", err)
	}
	if !strings.Contains(err.Error(), "198.18.0.100/24") {
		t.Errorf("message %q does not name the configured prefix", err)
	}
	if _, n := addrFlags(t, h.src, h.svc.Addr()); n != 1 {
		t.Errorf("after the refused Claim, the address is configured %d times, want once", n)
	}
	if !present(t, cfg) {
		t.Error("Present(/25) = false while /24 is configured; Present ignores the length")
	}
	if err := addrmove.Release(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if _, n := addrFlags(t, h.src, h.svc.Addr()); n != 0 {
		t.Errorf("Release(/25) left the /24 address configured")
	}
}

// TestClaimCancelled: a Claim whose context has ended adds nothing.
func TestClaimCancelled(t *testing.T) {
	h := newHosts(t, true)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := addrmove.Claim(ctx, h.cfg(h.dst)); !errors.Is(err, context.Canceled) {
		t.Fatalf("Claim with a cancelled context: %v, want context.Canceled", err)
	}
	if present(t, h.cfg(h.dst)) {
		t.Error("the cancelled Claim added the address")
	}
}

// TestCurrentNamespace: NetNS 0 means the calling thread's namespace.
func TestCurrentNamespace(t *testing.T) {
	h := newHosts(t, false)
	cfg := h.cfg(h.dst)
	cfg.NetNS = 0
	err := h.dst.Do(func() error { return addrmove.Claim(context.Background(), cfg) })
	if err != nil {
		t.Fatal(err)
	}
	if !present(t, h.cfg(h.dst)) {
		t.Fatal("Claim with NetNS 0 on a thread inside dst did not add the address to dst")
	}
	err = h.dst.Do(func() error { return addrmove.Release(context.Background(), cfg) })
	if err != nil {
		t.Fatal(err)
	}
	if present(t, h.cfg(h.dst)) {
		t.Fatal("Release with NetNS 0 on a thread inside dst left the address on dst")
	}
}

// TestInvalidConfig needs no namespace: validation comes before any netlink
// request.
func TestInvalidConfig(t *testing.T) {
	good := addrmove.Config{Prefix: netip.MustParsePrefix("198.18.0.100/24"), Dev: "nosuch0"}
	for name, mod := range map[string]func(*addrmove.Config){
		"no prefix":      func(c *addrmove.Config) { c.Prefix = netip.Prefix{} },
		"v4-mapped":      func(c *addrmove.Config) { c.Prefix = netip.MustParsePrefix("::ffff:198.18.0.100/120") },
		"unspecified":    func(c *addrmove.Config) { c.Prefix = netip.MustParsePrefix("0.0.0.0/0") },
		"multicast":      func(c *addrmove.Config) { c.Prefix = netip.MustParsePrefix("ff02::1/128") },
		"no device":      func(c *addrmove.Config) { c.Dev = "" },
		"long device":    func(c *addrmove.Config) { c.Dev = "sixteen-chars-xx" },
		"negative netns": func(c *addrmove.Config) { c.NetNS = -1 },
	} {
		cfg := good
		mod(&cfg)
		ctx := context.Background()
		_, perr := addrmove.Present(cfg)
		for op, err := range map[string]error{
			"Claim":   addrmove.Claim(ctx, cfg),
			"Release": addrmove.Release(ctx, cfg),
			"Present": perr,
		} {
			if !errors.Is(err, addrmove.ErrInvalidConfig) {
				t.Errorf("%s with %s: %v, want ErrInvalidConfig", op, name, err)
			}
		}
	}
}
