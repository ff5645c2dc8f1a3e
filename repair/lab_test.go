package repair

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// hosts is the lab of the cross-host tests: a peer that stays put, and a
// source and a target host between which the service address moves.
type hosts struct {
	lan            *lab.LAN
	peer, src, dst *lab.NS
	peerAddr, svc  netip.Addr
	bits           int
}

func newHosts(t *testing.T, v6 bool) *hosts {
	t.Helper()
	lan := lab.NewTestLAN(t, "peer", "src", "dst")
	h := &hosts{lan: lan, peer: lan.Host("peer"), src: lan.Host("src"), dst: lan.Host("dst")}
	base := [4]string{"198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.10"}
	h.bits = 24
	if v6 {
		base = [4]string{"fd00::1", "fd00::2", "fd00::3", "fd00::10"}
		h.bits = 64
	}
	for i, ns := range []*lab.NS{h.peer, h.src, h.dst} {
		if err := ns.AddAddr(netip.PrefixFrom(netip.MustParseAddr(base[i]), h.bits)); err != nil {
			t.Fatal(err)
		}
	}
	h.peerAddr = netip.MustParseAddr(base[0])
	h.svc = netip.MustParseAddr(base[3])
	if err := h.src.AddAddr(netip.PrefixFrom(h.svc, h.bits)); err != nil {
		t.Fatal(err)
	}
	return h
}

// moveLocked moves the connection on srcFd (tuple) from the source host to
// the target host as a migration does: srcLock locks it, Dump takes it
// (marked held if held), the source's copy is discarded (a duplicate, in
// repair mode: silent) and src closed, and the snapshot is restored on the
// target host behind a lock of its own (instance dstName), left in repair
// mode. It returns the snapshot, the restored socket and the target's lock.
func (h *hosts) moveLocked(t *testing.T, srcLock *firewall.Lock, srcFd int, src io.Closer, tuple firewall.Tuple, held bool, dstName string) (Snapshot, int, *firewall.Lock) {
	t.Helper()
	if err := srcLock.Lock([]firewall.Tuple{tuple}); err != nil {
		t.Fatal(err)
	}
	var snap Snapshot
	if err := h.src.Do(func() error { return Dump(srcFd, &snap) }); err != nil {
		t.Fatal(err)
	}
	if held {
		snap.MarkHeld()
	}
	if err := Discard(dupFd(t, srcFd)); err != nil {
		t.Fatal(err)
	}
	src.Close()
	dstLock := newLock(t, h.dst, dstName, false)
	if err := dstLock.Lock([]firewall.Tuple{tuple}); err != nil {
		t.Fatal(err)
	}
	var fd int
	if err := h.dst.Do(func() (err error) { fd, err = Restore(&snap); return err }); err != nil {
		t.Fatal(err)
	}
	return snap, fd, dstLock
}

// moveService moves the service address from the source to the target, as
// the switch phase of a migration does, and makes the peer forget the old
// link-layer address (a gratuitous ARP would do that on a real network).
func (h *hosts) moveService(t *testing.T) {
	t.Helper()
	p := netip.PrefixFrom(h.svc, h.bits)
	if err := h.src.DelAddr(p); err != nil {
		t.Fatal(err)
	}
	if err := h.dst.AddAddr(p); err != nil {
		t.Fatal(err)
	}
	if err := h.peer.FlushNeigh(h.svc); err != nil {
		t.Fatal(err)
	}
}

// nftLock drops the connection's packets on a host with a test-only table
// (the firewall package is tested on its own): those from the peer (in),
// those to it (out), or both. A second call adds to the table. Prerouting
// and output at priority -300 see packets before conntrack and before the
// route lookup, so the lock works before the address is local.
func nftLock(t *testing.T, ns *lab.NS, local, remote netip.AddrPort, in, out bool) {
	t.Helper()
	nftScript(t, ns, lockTable("repairtest", local, remote, in, out, ""))
}

// lockTable is the nft script of table name dropping, and counting, the
// packets of the connection between local and remote in the directions
// chosen; accept, if not empty, is a rule placed before the drop.
func lockTable(name string, local, remote netip.AddrPort, in, out bool, accept string) string {
	ipk := "ip"
	if local.Addr().Unmap().Is6() {
		ipk = "ip6"
	}
	l, r := unmap(local), unmap(remote)
	rule := func(from, to netip.AddrPort) string {
		s := fmt.Sprintf("%s saddr %s tcp sport %d %s daddr %s tcp dport %d counter drop", ipk, from.Addr(), from.Port(), ipk, to.Addr(), to.Port())
		if accept != "" {
			s = accept + "\n  " + s
		}
		return s
	}
	script := "table inet " + name + " {\n"
	if in {
		script += " chain pre { type filter hook prerouting priority -300;\n  " + rule(r, l) + "\n }\n"
	}
	if out {
		script += " chain out { type filter hook output priority -300;\n  " + rule(l, r) + "\n }\n"
	}
	return script + "}\n"
}

// nftScript runs nft -f with script in ns.
func nftScript(t *testing.T, ns *lab.NS, script string) {
	t.Helper()
	cmd := ns.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s: %v: %s\n%s", ns.Label, err, out, script)
	}
}

func nftUnlock(t *testing.T, ns *lab.NS) {
	t.Helper()
	if out, err := ns.Exec("nft", "delete", "table", "inet", "repairtest"); err != nil {
		t.Fatalf("nft unlock in %s: %v: %s", ns.Label, err, out)
	}
}

// wantNoQueue fails the test unless the socket fd, in repair mode, has no
// queue selected (Restore's promise: a send or a read on it fails instead
// of touching a queue).
func wantNoQueue(t *testing.T, fd int) {
	t.Helper()
	q, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE)
	if err != nil {
		t.Fatal("getsockopt TCP_REPAIR_QUEUE: ", err)
	}
	if q != tcpNoQueue {
		t.Errorf("restored socket has queue %d selected, want none", q)
	}
}

// restoredConn wraps the restored descriptor fd, out of repair mode, in a
// *net.TCPConn that owns it (fd itself is closed).
func restoredConn(t *testing.T, fd int) *net.TCPConn {
	t.Helper()
	f := os.NewFile(uintptr(fd), "restored")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// dialPeer connects a rawDial socket from local in h.src (setup runs on
// it) to a listener at peerAP in h.peer (lnSetup runs on the listener),
// and returns both ends.
func dialPeer(t *testing.T, h *hosts, family int, local, peerAP netip.AddrPort, lnSetup, setup func(fd int) error) (src, peer *net.TCPConn) {
	t.Helper()
	ln := listen(t, h.peer, peerAP, lnSetup)
	src = rawDial(t, h.src, family, local, peerAP, setup)
	pc, err := ln.Accept()
	if err != nil {
		src.Close()
		t.Fatal(err)
	}
	return src, pc.(*net.TCPConn)
}

// rawDial creates a TCP socket of the given family in ns, binds it to local
// and connects it to remote; IPv4 addresses on an AF_INET6 socket are used
// IPv4-mapped (a dual-stack socket). It returns the connection.
func rawDial(t *testing.T, ns *lab.NS, family int, local, remote netip.AddrPort, setup func(fd int) error) *net.TCPConn {
	t.Helper()
	var conn net.Conn
	err := ns.Do(func() error {
		fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		if err != nil {
			return err
		}
		f := os.NewFile(uintptr(fd), "dial")
		defer f.Close()
		if family == unix.AF_INET6 {
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
				return err
			}
		}
		if setup != nil {
			if err := setup(fd); err != nil {
				return err
			}
		}
		if err := unix.Bind(fd, sockaddr(family, local)); err != nil {
			return fmt.Errorf("bind %s: %w", local, err)
		}
		if err := unix.Connect(fd, sockaddr(family, remote)); err != nil {
			return fmt.Errorf("connect %s: %w", remote, err)
		}
		conn, err = net.FileConn(f)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return conn.(*net.TCPConn)
}

func sockaddr(family int, ap netip.AddrPort) unix.Sockaddr {
	if family == unix.AF_INET {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
	}
	a := ap.Addr()
	if a.Is4() {
		a = netip.AddrFrom16(a.As16())
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16()}
}

// listen opens a listener in ns; setup runs on the listening socket (its
// options are inherited by accepted connections).
func listen(t *testing.T, ns *lab.NS, addr netip.AddrPort, setup func(fd int) error) net.Listener {
	t.Helper()
	var ln net.Listener
	err := ns.Do(func() error {
		lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				if setup != nil {
					serr = setup(int(fd))
				}
			}); err != nil {
				return err
			}
			return serr
		}}
		var err error
		ln, err = lc.Listen(context.Background(), "tcp", addr.String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// pattern fills b with the test stream of direction dir starting at offset
// off. Every byte depends on its offset, so a lost, repeated or reordered
// byte shows up as a mismatch.
func pattern(b []byte, dir byte, off int64) {
	for i := range b {
		x := uint64(off+int64(i)) + uint64(dir)<<40
		x ^= x >> 7
		x *= 0x9E3779B97F4A7C15
		b[i] = byte(x >> 56)
	}
}

// checkStream reads n bytes from r and compares them with the pattern of dir
// from offset off.
func checkStream(r io.Reader, dir byte, off, n int64) error {
	buf := make([]byte, 64<<10)
	want := make([]byte, len(buf))
	for done := int64(0); done < n; {
		k := int(min(int64(len(buf)), n-done))
		m, err := io.ReadFull(r, buf[:k])
		if err != nil {
			return fmt.Errorf("read at offset %d: %w", off+done, err)
		}
		pattern(want[:m], dir, off+done)
		if !bytes.Equal(buf[:m], want[:m]) {
			i := 0
			for buf[i] == want[i] {
				i++
			}
			return fmt.Errorf("stream %d corrupt at offset %d", dir, off+done+int64(i))
		}
		done += int64(m)
	}
	return nil
}

func writeStream(w io.Writer, dir byte, off, n int64) error {
	buf := make([]byte, 64<<10)
	for done := int64(0); done < n; {
		k := int(min(int64(len(buf)), n-done))
		pattern(buf[:k], dir, off+done)
		m, err := w.Write(buf[:k])
		done += int64(m)
		if err != nil {
			return fmt.Errorf("write at offset %d: %w", off+done, err)
		}
	}
	return nil
}

// newLock makes a firewall lock (holding, with hold) in ns that the test's
// cleanup closes.
func newLock(t testing.TB, ns *lab.NS, instance string, hold bool) *firewall.Lock {
	t.Helper()
	l, err := firewall.New(firewall.Config{Instance: instance, NetNS: ns.Handle(), Hold: hold})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	if hold && !l.CanHold() {
		t.Fatal("the kernel refused the hold rule")
	}
	return l
}

// newInjector opens an Injector with mark in ns that the test's cleanup
// closes.
func newInjector(t testing.TB, ns *lab.NS, mark uint32) *Injector {
	t.Helper()
	var in *Injector
	if err := ns.Do(func() (err error) { in, err = NewInjector(mark); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close() })
	return in
}

// inspected runs Inspect on fd in ns and returns the snapshot it began.
func inspected(t *testing.T, ns *lab.NS, fd int) *Snapshot {
	t.Helper()
	s := new(Snapshot)
	if err := ns.Do(func() error { return Inspect(fd, s) }); err != nil {
		t.Fatal(err)
	}
	return s
}

// wantPeerNoReset fails the test if the peer's counters of resets, sent
// or received, or of failed connection attempts moved since before.
func wantPeerNoReset(t *testing.T, h *hosts, before map[string]int64) {
	t.Helper()
	after := tcpCounters(t, h.peer)
	for _, k := range []string{"EstabResets", "OutRsts", "AttemptFails"} {
		if after[k] != before[k] {
			t.Errorf("peer counter %s moved: %d -> %d", k, before[k], after[k])
		}
	}
}

// wantNoChallengeACK fails the test if the target answered a segment with
// a challenge ACK: one it thought out of order (such as an ACK of a FIN it
// does not believe sent), which it dropped.
func wantNoChallengeACK(t *testing.T, h *hosts) {
	t.Helper()
	m, err := h.dst.TCPExtCounters()
	if err != nil {
		t.Fatal(err)
	}
	if n := m["TCPChallengeACK"]; n != 0 {
		t.Errorf("the target sent %d challenge ACKs: it refused the peer's segments", n)
	}
}

// tcpCounters reads the Tcp counters of /proc/net/snmp in ns.
func tcpCounters(t *testing.T, ns *lab.NS) map[string]int64 {
	t.Helper()
	m, err := ns.TCPCounters()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func tcpExtCounters(t *testing.T, ns *lab.NS) map[string]int64 {
	t.Helper()
	m, err := ns.TCPExtCounters()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// captureFlags runs tcpdump on the switch's bridge, keeping TCP segments of
// port with RST or FIN set. stop ends it and returns the segments it saw.
func captureFlags(t *testing.T, lan *lab.LAN, port uint16, v6 bool) (stop func() []string) {
	t.Helper()
	c, err := lan.CaptureFlags(port, v6, t.TempDir()+"/cap.pcap")
	if err != nil {
		t.Fatal(err)
	}
	return func() []string {
		segs, err := c.Stop()
		if err != nil {
			t.Fatal(err)
		}
		return segs
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func fdOf(t *testing.T, c *net.TCPConn) int {
	t.Helper()
	var fd int
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(f uintptr) { fd = int(f) })
	return fd
}
