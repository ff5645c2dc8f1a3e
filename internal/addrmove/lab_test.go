package addrmove_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/addrmove"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// servicePort is where every host of the lab serves its label.
const servicePort = 7000

// hosts is the lab of the cross-host tests: a peer that stays put, and a
// source and a target host between which the service address moves. Each
// host has its own address on eth0; the service address starts on src.
type hosts struct {
	peer, src, dst *lab.NS
	svc            netip.Prefix
}

func newHosts(t *testing.T, v6 bool) *hosts {
	t.Helper()
	lan := lab.NewTestLAN(t, "peer", "src", "dst")
	h := &hosts{peer: lan.Host("peer"), src: lan.Host("src"), dst: lan.Host("dst")}
	own := []string{"198.18.0.1/24", "198.18.0.2/24", "198.18.0.3/24"}
	h.svc = netip.MustParsePrefix("198.18.0.100/24")
	if v6 {
		own = []string{"fd00::1/64", "fd00::2/64", "fd00::3/64"}
		h.svc = netip.MustParsePrefix("fd00::100/64")
	}
	for i, ns := range []*lab.NS{h.peer, h.src, h.dst} {
		if err := ns.AddAddr(netip.MustParsePrefix(own[i])); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.src.AddAddr(h.svc); err != nil {
		t.Fatal(err)
	}
	return h
}

// cfg is the Config that acts on the service address of ns's eth0.
func (h *hosts) cfg(ns *lab.NS) addrmove.Config {
	return addrmove.Config{Prefix: h.svc, Dev: "eth0", NetNS: ns.Handle()}
}

// svcPort is the service address and port that the peer connects to.
func (h *hosts) svcPort() netip.AddrPort {
	return netip.AddrPortFrom(h.svc.Addr(), servicePort)
}

func families(t *testing.T, fn func(t *testing.T, v6 bool)) {
	t.Run("ipv4", func(t *testing.T) { fn(t, false) })
	t.Run("ipv6", func(t *testing.T) { fn(t, true) })
}

// handle opens a route netlink handle inside ns, closed when the test ends.
func handle(t *testing.T, ns *lab.NS) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(netns.NsHandle(ns.Handle()), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatalf("netlink in %s: %v", ns.Label, err)
	}
	t.Cleanup(h.Close)
	return h
}

// mac returns the hardware address of ns's eth0.
func mac(t *testing.T, ns *lab.NS) net.HardwareAddr {
	t.Helper()
	link, err := handle(t, ns).LinkByName("eth0")
	if err != nil {
		t.Fatalf("eth0 of %s: %v", ns.Label, err)
	}
	return link.Attrs().HardwareAddr
}

// neighbour returns ns's neighbour entry for addr on eth0, read from the
// kernel's neighbour table.
func neighbour(t *testing.T, ns *lab.NS, addr netip.Addr) (netlink.Neigh, bool) {
	t.Helper()
	h := handle(t, ns)
	link, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatalf("eth0 of %s: %v", ns.Label, err)
	}
	family := unix.AF_INET
	if addr.Is6() {
		family = unix.AF_INET6
	}
	list, err := h.NeighList(link.Attrs().Index, family)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		t.Fatalf("neighbours of %s: %v", ns.Label, err)
	}
	for _, n := range list {
		if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == addr {
			return n, true
		}
	}
	return netlink.Neigh{}, false
}

func describe(n netlink.Neigh, ok bool) string {
	if !ok {
		return "no entry"
	}
	return n.HardwareAddr.String() + " " + nudName(n.State)
}

func nudName(state int) string {
	names := map[int]string{
		netlink.NUD_INCOMPLETE: "INCOMPLETE", netlink.NUD_REACHABLE: "REACHABLE",
		netlink.NUD_STALE: "STALE", netlink.NUD_DELAY: "DELAY", netlink.NUD_PROBE: "PROBE",
		netlink.NUD_FAILED: "FAILED", netlink.NUD_NOARP: "NOARP", netlink.NUD_PERMANENT: "PERMANENT",
	}
	if s, ok := names[state]; ok {
		return s
	}
	return "state " + strconv.Itoa(state)
}

// eventually polls cond every few milliseconds until it holds, and fails the
// test with cond's last description if it does not within timeout.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; last seen: %s", what, timeout, last)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitNeighbour waits until ns's neighbour entry for addr holds want.
func waitNeighbour(t *testing.T, ns *lab.NS, addr netip.Addr, want net.HardwareAddr, who string) {
	t.Helper()
	eventually(t, 2*time.Second, ns.Label+"'s neighbour entry for "+addr.String()+" holds "+who+"'s MAC "+want.String(),
		func() (bool, string) {
			n, ok := neighbour(t, ns, addr)
			return ok && n.HardwareAddr.String() == want.String(), describe(n, ok)
		})
}

// serve accepts TCP connections on every address of ns at servicePort, and
// answers each with label and a newline. It stops when the test ends.
func serve(t *testing.T, ns *lab.NS, label string) {
	t.Helper()
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", ":"+strconv.Itoa(servicePort))
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", ns.Label, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			_, _ = io.WriteString(c, label+"\n")
			// Let the client close first, so that this side is not
			// left retransmitting a FIN to an address that moved.
			_, _ = io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
}

// ask opens a new TCP connection from ns to ap and returns the label of the
// host that answered.
func ask(t *testing.T, ns *lab.NS, ap netip.AddrPort) string {
	t.Helper()
	var label string
	err := ns.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", ap.String())
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		label, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	if err != nil {
		t.Fatalf("connect from %s to %s: %v", ns.Label, ap, err)
	}
	return strings.TrimSpace(label)
}

// addrFlags returns the flags of addr on ns's eth0, and whether it is there.
func addrFlags(t *testing.T, ns *lab.NS, addr netip.Addr) (flags int, count int) {
	t.Helper()
	h := handle(t, ns)
	link, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatalf("eth0 of %s: %v", ns.Label, err)
	}
	list, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatalf("addresses of %s: %v", ns.Label, err)
	}
	for _, a := range list {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == addr {
			flags |= a.Flags
			count++
		}
	}
	return flags, count
}

func present(t *testing.T, cfg addrmove.Config) bool {
	t.Helper()
	ok, err := addrmove.Present(cfg)
	if err != nil {
		t.Fatalf("Present: %v", err)
	}
	return ok
}

// sysctl writes a value under /proc/sys/net inside ns.
func sysctl(t *testing.T, ns *lab.NS, key, value string) {
	t.Helper()
	err := ns.Do(func() error {
		return os.WriteFile("/proc/sys/net/"+key, []byte(value), 0)
	})
	if err != nil {
		t.Fatalf("sysctl %s in %s: %v", key, ns.Label, err)
	}
}
