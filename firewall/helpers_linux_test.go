package firewall

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"golang.org/x/sys/unix"
)

// family is an address plan for the two hosts of a test LAN.
type family struct {
	name string
	a, b netip.Prefix
}

var families = []family{
	{"ipv4", netip.MustParsePrefix("198.18.0.1/24"), netip.MustParsePrefix("198.18.0.2/24")},
	{"ipv6", netip.MustParsePrefix("fd00::1/64"), netip.MustParsePrefix("fd00::2/64")},
}

// newLAN builds hosts a and b on one bridge, addressed in both families.
func newLAN(t *testing.T) (a, b *lab.NS) {
	t.Helper()
	lan := lab.NewTestLAN(t, "a", "b")
	a, b = lan.Host("a"), lan.Host("b")
	for _, f := range families {
		if err := a.AddAddr(f.a); err != nil {
			t.Fatal(err)
		}
		if err := b.AddAddr(f.b); err != nil {
			t.Fatal(err)
		}
	}
	return a, b
}

// newTestLock creates a lock that the test's cleanup closes.
func newTestLock(t testing.TB, cfg Config) *Lock {
	t.Helper()
	l, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return l
}

// dialPair connects a client in host a to a listener in host b and returns
// both ends.
func dialPair(t *testing.T, a, b *lab.NS, f family) (ca, cb *net.TCPConn) {
	t.Helper()
	var ln net.Listener
	err := b.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(f.b.Addr(), 0).String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	err = a.Do(func() error {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			ca = c.(*net.TCPConn)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	cb = c.(*net.TCPConn)
	t.Cleanup(func() { ca.Close(); cb.Close() })
	return ca, cb
}

// tupleOf is the connection of c as its own host sees it.
func tupleOf(c net.Conn) Tuple {
	return Tuple{
		Local:  c.LocalAddr().(*net.TCPAddr).AddrPort(),
		Remote: c.RemoteAddr().(*net.TCPAddr).AddrPort(),
	}
}

// sockInfo returns TCP_INFO and SO_ERROR of c.
func sockInfo(t *testing.T, c *net.TCPConn) (*unix.TCPInfo, int) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var soErr int
	var serr error
	err = rc.Control(func(fd uintptr) {
		info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		if serr == nil {
			soErr, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		t.Fatal(err)
	}
	return info, soErr
}

func bytesReceived(t *testing.T, c *net.TCPConn) uint64 {
	t.Helper()
	info, _ := sockInfo(t, c)
	return info.Bytes_received
}

// checkHealthy fails unless c is ESTABLISHED with no pending socket error.
func checkHealthy(t *testing.T, name string, c *net.TCPConn) {
	t.Helper()
	info, soErr := sockInfo(t, c)
	if info.State != unix.BPF_TCP_ESTABLISHED || soErr != 0 {
		t.Errorf("%s: state %d, SO_ERROR %d; want ESTABLISHED and 0", name, info.State, soErr)
	}
}

// procNet reads /proc/thread-self/net/NAME inside ns (/proc/self/net would
// show the namespace of the process's main thread, not of ns).
func procNet(t *testing.T, ns *lab.NS, name string) string {
	t.Helper()
	var out []byte
	err := ns.Do(func() error {
		var err error
		out, err = os.ReadFile("/proc/thread-self/net/" + name)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// checkNoRSTs fails the test if host ns, called name, sent an RST since its
// OutRsts counter read before.
func checkNoRSTs(t *testing.T, name string, ns *lab.NS, before uint64) {
	t.Helper()
	if d := snmp(t, ns, "Tcp", "OutRsts") - before; d != 0 {
		t.Errorf("%s sent %d RSTs", name, d)
	}
}

// snmp returns a counter of /proc/net/snmp in ns, such as ("Tcp", "OutRsts").
func snmp(t *testing.T, ns *lab.NS, proto, field string) uint64 {
	t.Helper()
	var header []string
	for line := range strings.Lines(procNet(t, ns, "snmp")) {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != proto+":" {
			continue
		}
		if header == nil {
			header = f
			continue
		}
		for i := range header {
			if header[i] == field && i < len(f) {
				v, err := strconv.ParseUint(f[i], 10, 64)
				if err != nil {
					t.Fatal(err)
				}
				return v
			}
		}
	}
	t.Fatalf("no %s %s in /proc/net/snmp", proto, field)
	return 0
}

// conntrackEntry returns the line of /proc/net/nf_conntrack in ns for the
// connection with those ports, or "".
func conntrackEntry(t *testing.T, ns *lab.NS, tu Tuple) string {
	t.Helper()
	want := fmt.Sprintf("sport=%d dport=%d ", tu.Remote.Port(), tu.Local.Port())
	for line := range strings.Lines(procNet(t, ns, "nf_conntrack")) {
		if strings.Contains(line, want) {
			return strings.TrimSpace(line)
		}
	}
	return ""
}

// conntrackPackets returns the sum of the packets= fields of an entry.
func conntrackPackets(t *testing.T, line string) uint64 {
	t.Helper()
	var sum uint64
	n := 0
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, "packets="); ok {
			p, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			sum += p
			n++
		}
	}
	if n != 2 {
		t.Fatalf("conntrack entry without accounting (nf_conntrack_acct): %q", line)
	}
	return sum
}

// conntrackAcct turns on conntrack's packet accounting in ns, which
// conntrackPackets reads.
func conntrackAcct(t *testing.T, ns *lab.NS) {
	t.Helper()
	if err := ns.Do(func() error {
		return os.WriteFile("/proc/sys/net/netfilter/nf_conntrack_acct", []byte("1"), 0)
	}); err != nil {
		t.Fatal(err)
	}
}

// dropCounts returns the packets counted by the drop rules of each chain
// of a lock table, read back from the kernel.
func dropCounts(t *testing.T, ns *lab.NS, table string) (in, out uint64) {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(ns.Handle()))
	if err != nil {
		t.Fatal(err)
	}
	tab := &nftables.Table{Name: table, Family: nftables.TableFamilyINet}
	for _, ch := range []string{chainIn, chainOut} {
		rules, err := c.GetRules(tab, &nftables.Chain{Name: ch, Table: tab})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			for _, e := range r.Exprs {
				if cn, ok := e.(*expr.Counter); ok {
					if ch == chainIn {
						in += cn.Packets
					} else {
						out += cn.Packets
					}
				}
			}
		}
	}
	return in, out
}

// setLen counts the keys of a lock set, read back from the kernel, once two
// dumps in a row list the same keys. A dump is no snapshot: one that
// overlaps the commit of a renewal (delete and re-add of the same keys)
// checks the generation of the elements as of its start, so it can miss a
// key or list it twice; and the parts of a long dump resume by position, so
// while the kernel resizes the set's hash table after a large batch they
// repeat some elements and skip others (seen: 8,669 distinct keys of 10,000
// right after a renewal, all of them 50 ms later). Packets never see
// either: each lookup uses the current generation, and a resize keeps
// every element reachable.
func setLen(t testing.TB, ns *lab.NS, table, set string) int {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(ns.Handle()))
	if err != nil {
		t.Fatal(err)
	}
	tab := &nftables.Table{Name: table, Family: nftables.TableFamilyINet}
	var last map[string]bool
	for range 50 {
		els, err := c.GetSetElements(&nftables.Set{Table: tab, Name: set})
		if err != nil {
			t.Fatal(err)
		}
		keys := make(map[string]bool, len(els))
		for _, e := range els {
			keys[string(e.Key)] = true
		}
		if last != nil && maps.Equal(keys, last) {
			return len(keys)
		}
		last = keys
	}
	t.Fatalf("set %s of %s keeps changing", set, table)
	return 0
}

// tableNames lists the inet tables of ns.
func tableNames(t *testing.T, ns *lab.NS) []string {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(ns.Handle()))
	if err != nil {
		t.Fatal(err)
	}
	tabs, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tb := range tabs {
		names = append(names, tb.Name)
	}
	return names
}

// nftScript loads an nft(8) script into ns.
func nftScript(t *testing.T, ns *lab.NS, script string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "rules.nft")
	if err := os.WriteFile(path, []byte(script), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ns.Exec("nft", "-f", path); err != nil {
		t.Fatal(err)
	}
}

// nftList runs "nft list ARGS..." in ns.
func nftList(t *testing.T, ns *lab.NS, args ...string) string {
	t.Helper()
	out, err := ns.Exec("nft", append([]string{"list"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// waitFor polls cond every 20 ms until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pattern returns n deterministic bytes that differ per seed and offset.
func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed ^ byte(i) ^ byte(i>>8)*31
	}
	return b
}

// write writes p to c, failing the test if it cannot.
func write(t *testing.T, c net.Conn, p []byte) {
	t.Helper()
	if _, err := c.Write(p); err != nil {
		t.Fatal(err)
	}
}

// readExactly reads len(want) bytes from c within timeout and fails unless
// they are want.
func readExactly(t *testing.T, name string, c *net.TCPConn, want []byte, timeout time.Duration) {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	n, err := io.ReadFull(c, got)
	if err != nil {
		t.Fatalf("%s: read %d of %d bytes: %v", name, n, len(want), err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: %d bytes arrived but differ from byte %d on", name, n, i)
	}
	c.SetReadDeadline(time.Time{})
}

// lines reads lines from r into a channel until EOF.
func lines(r io.Reader) <-chan string {
	ch := make(chan string, 16)
	go func() {
		defer close(ch)
		s := bufio.NewScanner(r)
		for s.Scan() {
			ch <- s.Text()
		}
	}()
	return ch
}
