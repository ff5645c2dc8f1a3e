package firewall

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// childEnv makes the test binary act as a lock-holding agent (see
// runChild) instead of running tests.
const childEnv = "TCPMIGRATE_FIREWALL_TEST_CHILD"

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(runChild(spec))
	}
	goleak.VerifyTestMain(m)
}

// runChild is an agent that locks one tuple with a short lease, says
// "locked" on stdout and then waits for stdin to close (it is SIGKILLed
// first). spec is "netns-name instance lease local remote".
func runChild(spec string) int {
	f := strings.Fields(spec)
	if len(f) != 5 {
		fmt.Fprintf(os.Stderr, "bad child spec %q\n", spec)
		return 2
	}
	ns, err := os.Open("/run/netns/" + f[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	lease, err := time.ParseDuration(f[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	l, err := New(Config{Instance: f[1], NetNS: int(ns.Fd()), Lease: lease})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	tu := Tuple{Local: netip.MustParseAddrPort(f[3]), Remote: netip.MustParseAddrPort(f[4])}
	if err := l.Lock([]Tuple{tu}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("locked")
	var buf [1]byte
	os.Stdin.Read(buf[:])
	return 0
}

// TestLockHoldsFlow locks a live connection on host b and checks, for each
// address family: nothing sent either way arrives while locked and the
// drop rules count the packets; conntrack on b never sees them; after the
// unlock every byte arrives exactly once, in order, without any RST and
// through a stateful ruleset that drops invalid packets.
//
// With release, the flow is let through by Release (every rule removed at
// once) instead of Unlock; the Lock then refuses to lock again.
func TestLockHoldsFlow(t *testing.T) {
	for _, f := range families {
		for _, release := range []bool{false, true} {
			name := f.name
			if release {
				name += "/release"
			}
			t.Run(name, func(t *testing.T) { testLockHoldsFlow(t, f, release) })
		}
	}
}

func testLockHoldsFlow(t *testing.T, f family, release bool) {
	a, b := newLAN(t)
	// A stateful ruleset of b's own, after conntrack: dropping invalid
	// packets would break the flow if the lock had confused conntrack.
	nftScript(t, b, `table inet host {
	chain input {
		type filter hook input priority filter; policy accept;
		ct state invalid counter drop
	}
	chain output {
		type filter hook output priority filter; policy accept;
		ct state invalid counter drop
	}
}
`)
	conntrackAcct(t, b)

	ca, cb := dialPair(t, a, b, f)
	hello := pattern(1, 1000)
	write(t, ca, hello)
	readExactly(t, "b", cb, hello, 5*time.Second)
	write(t, cb, hello)
	readExactly(t, "a", ca, hello, 5*time.Second)

	l := newTestLock(t, Config{Instance: "flow", NetNS: b.Handle()})
	tu := tupleOf(cb)
	if err := l.Lock([]Tuple{tu}); err != nil {
		t.Fatal(err)
	}
	ct := conntrackEntry(t, b, tu)
	if ct == "" {
		t.Fatal("no conntrack entry for the connection on b")
	}
	ctBefore := conntrackPackets(t, ct)
	rstA, rstB := snmp(t, a, "Tcp", "OutRsts"), snmp(t, b, "Tcp", "OutRsts")
	recvA, recvB := bytesReceived(t, ca), bytesReceived(t, cb)

	toB, toA := pattern(2, 64<<10), pattern(3, 32<<10)
	write(t, ca, toB)
	write(t, cb, toA)
	// Two drops per chain: the first transmission and at least one
	// retransmission on each side.
	waitFor(t, 10*time.Second, "drops in both chains", func() bool {
		in, out := dropCounts(t, b, l.Table())
		return in >= 2 && out >= 2
	})
	if got := bytesReceived(t, cb); got != recvB {
		t.Errorf("b received %d bytes while locked", got-recvB)
	}
	if got := bytesReceived(t, ca); got != recvA {
		t.Errorf("a received %d bytes while locked", got-recvA)
	}
	ct = conntrackEntry(t, b, tu)
	if got := conntrackPackets(t, ct); got != ctBefore {
		t.Errorf("conntrack on b saw %d packets the lock dropped: %s", got-ctBefore, ct)
	}
	in, out := dropCounts(t, b, l.Table())
	t.Logf("locked: dropped %d inbound, %d outbound packets", in, out)

	start := time.Now()
	if release {
		if err := l.Release(); err != nil {
			t.Fatal(err)
		}
	} else if err := l.Unlock([]Tuple{tu}); err != nil {
		t.Fatal(err)
	}
	readExactly(t, "b", cb, toB, 15*time.Second)
	readExactly(t, "a", ca, toA, 15*time.Second)
	t.Logf("flow resumed %v after the unlock", time.Since(start).Round(time.Millisecond))
	bye := pattern(4, 100)
	write(t, ca, bye)
	readExactly(t, "b", cb, bye, 5*time.Second)
	write(t, cb, bye)
	readExactly(t, "a", ca, bye, 5*time.Second)

	checkHealthy(t, "a", ca)
	checkHealthy(t, "b", cb)
	checkNoRSTs(t, "a", a, rstA)
	checkNoRSTs(t, "b", b, rstB)
	ct = conntrackEntry(t, b, tu)
	if !strings.Contains(ct, " ESTABLISHED ") || conntrackPackets(t, ct) <= ctBefore {
		t.Errorf("conntrack entry after the unlock: %s", ct)
	}
	if host := nftList(t, b, "table", "inet", "host"); strings.Count(host, "counter packets 0 bytes 0") != 2 {
		t.Errorf("b's ruleset dropped invalid packets:\n%s", host)
	}
	n := setLen(t, b, l.Table(), setV4) + setLen(t, b, l.Table(), setV6)
	switch {
	case !release && n != 0:
		t.Errorf("%d elements left after the unlock", n)
	case release && n != 1:
		// The element stays until Close: only the rules went.
		t.Errorf("%d elements after the release, want the one", n)
	}
	if release {
		if err := l.Lock([]Tuple{tu}); !errors.Is(err, ErrReleased) {
			t.Errorf("Lock after Release: %v, want ErrReleased", err)
		}
	}
}

// TestBypassMark checks that packets carrying exactly the bypass mark pass
// both chains of a held lock, while unmarked packets and packets with
// another mark are dropped. Both ends live on host b, so the marked
// packets cross the output chain and then, looped back, the prerouting
// chain.
func TestBypassMark(t *testing.T) {
	_, b := newLAN(t)
	l := newTestLock(t, Config{Instance: "bypass", NetNS: b.Handle()})
	if l.BypassMark() != DefaultBypassMark {
		t.Fatalf("BypassMark() = %#x", l.BypassMark())
	}
	for _, tc := range []struct {
		name   string
		mark   uint32
		passes bool
	}{
		{"exact", DefaultBypassMark, true},
		{"other", DefaultBypassMark | 1<<16, false},
		{"none", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ln net.Listener
			var client *net.TCPConn
			err := b.Do(func() error {
				var err error
				ln, err = net.Listen("tcp", "198.18.0.2:0")
				if err != nil {
					return err
				}
				d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
					var serr error
					err := rc.Control(func(fd uintptr) {
						serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(tc.mark))
					})
					if err != nil {
						return err
					}
					return serr
				}}
				c, err := d.Dial("tcp", ln.Addr().String())
				if err == nil {
					client = c.(*net.TCPConn)
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			sc, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			server := sc.(*net.TCPConn)
			defer client.Close()
			defer server.Close()

			tu := tupleOf(client)
			if err := l.Lock([]Tuple{tu}); err != nil {
				t.Fatal(err)
			}
			in0, out0 := dropCounts(t, b, l.Table())
			recvServer, recvClient := bytesReceived(t, server), bytesReceived(t, client)
			fromClient, fromServer := pattern(5, 4000), pattern(6, 3000)
			write(t, client, fromClient)
			write(t, server, fromServer)
			if tc.passes {
				// The marked client's data arrives through both chains; the
				// unmarked server's replies are dropped.
				readExactly(t, "server", server, fromClient, 5*time.Second)
				waitFor(t, 10*time.Second, "drops of the server's packets", func() bool {
					_, out := dropCounts(t, b, l.Table())
					return out > out0
				})
			} else {
				waitFor(t, 10*time.Second, "drops of both ends' packets", func() bool {
					_, out := dropCounts(t, b, l.Table())
					return out >= out0+2
				})
				if got := bytesReceived(t, server); got != recvServer {
					t.Errorf("server received %d bytes from a client marked %#x", got-recvServer, tc.mark)
				}
			}
			if got := bytesReceived(t, client); got != recvClient {
				t.Errorf("client received %d unmarked bytes through the lock", got-recvClient)
			}
			if in, _ := dropCounts(t, b, l.Table()); in != in0 {
				// Looped-back packets were already dropped on output.
				t.Errorf("prerouting dropped %d looped-back packets", in-in0)
			}
			if err := l.Unlock([]Tuple{tu}); err != nil {
				t.Fatal(err)
			}
			if !tc.passes {
				readExactly(t, "server", server, fromClient, 15*time.Second)
			}
			readExactly(t, "client", client, fromServer, 15*time.Second)
		})
	}
}

// TestBothEndsOnOneHost locks both ends of a connection that lives on one
// host, as the same agent does for a loopback connection: both directions
// stay held, conntrack sees none of the dropped packets, unlocking one end
// keeps the connection held (the other end's element still matches every
// packet), and after unlocking both every byte arrives, with no RST.
func TestBothEndsOnOneHost(t *testing.T) {
	_, b := newLAN(t)
	nftScript(t, b, `table inet host {
	chain output {
		type filter hook output priority filter; policy accept;
		ct state invalid counter drop
	}
}
`)
	conntrackAcct(t, b)
	client, server := dialPair(t, b, b, families[0])
	hello := pattern(8, 100)
	write(t, client, hello)
	readExactly(t, "server", server, hello, 5*time.Second)

	l := newTestLock(t, Config{Instance: "both", NetNS: b.Handle()})
	cTu, sTu := tupleOf(client), tupleOf(server)
	if cTu.Local != sTu.Remote || cTu.Remote != sTu.Local {
		t.Fatalf("tuples %v and %v are not mirrors", cTu, sTu)
	}
	if err := l.Lock([]Tuple{cTu, sTu}); err != nil {
		t.Fatal(err)
	}
	if n := setLen(t, b, l.Table(), setV4); n != 2 {
		t.Fatalf("%d elements for both ends, want 2", n)
	}
	ct := conntrackEntry(t, b, sTu)
	if ct == "" {
		t.Fatal("no conntrack entry for the connection")
	}
	ctBefore := conntrackPackets(t, ct)
	rst := snmp(t, b, "Tcp", "OutRsts")
	recvC, recvS := bytesReceived(t, client), bytesReceived(t, server)
	toS, toC := pattern(9, 20000), pattern(10, 10000)
	write(t, client, toS)
	write(t, server, toC)
	waitFor(t, 10*time.Second, "drops of both ends' packets", func() bool {
		_, out := dropCounts(t, b, l.Table())
		return out >= 2
	})

	if err := l.Unlock([]Tuple{cTu}); err != nil {
		t.Fatal(err)
	}
	_, out0 := dropCounts(t, b, l.Table())
	waitFor(t, 10*time.Second, "a retransmission dropped with one end unlocked", func() bool {
		_, out := dropCounts(t, b, l.Table())
		return out > out0
	})
	if got := bytesReceived(t, server); got != recvS {
		t.Errorf("server received %d bytes while locked", got-recvS)
	}
	if got := bytesReceived(t, client); got != recvC {
		t.Errorf("client received %d bytes while locked", got-recvC)
	}
	if in, _ := dropCounts(t, b, l.Table()); in != 0 {
		t.Errorf("prerouting dropped %d packets; output should have dropped them all", in)
	}
	if got := conntrackPackets(t, conntrackEntry(t, b, sTu)); got != ctBefore {
		t.Errorf("conntrack saw %d of the dropped packets", got-ctBefore)
	}

	if err := l.Unlock([]Tuple{sTu}); err != nil {
		t.Fatal(err)
	}
	readExactly(t, "server", server, toS, 15*time.Second)
	readExactly(t, "client", client, toC, 15*time.Second)
	checkHealthy(t, "client", client)
	checkHealthy(t, "server", server)
	checkNoRSTs(t, "b", b, rst)
	if n := setLen(t, b, l.Table(), setV4); n != 0 {
		t.Errorf("%d elements left", n)
	}
}

// tuples returns n distinct tuples of the family of local.
func tuples(n int, local, remote netip.Addr) []Tuple {
	ts := make([]Tuple, n)
	for i := range ts {
		ts[i] = Tuple{
			Local:  netip.AddrPortFrom(local, 80+uint16(i/50000)),
			Remote: netip.AddrPortFrom(remote, 10000+uint16(i%50000)),
		}
	}
	return ts
}

// TestManyTuples locks and unlocks 10,000 connections of each family,
// each call one batch, and counts the elements in the kernel: one per tuple.
func TestManyTuples(t *testing.T) {
	ns := lab.NewTestNS(t, "many")
	l := newTestLock(t, Config{Instance: "many", NetNS: ns.Handle()})
	const n = 10000
	v4 := tuples(n, netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.1.1"))
	v6 := tuples(n, netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00::1:1"))
	// IPv4-mapped addresses name the same connections as plain IPv4.
	mapped := make([]Tuple, n)
	for i, tu := range v4 {
		mapped[i] = Tuple{
			Local:  netip.AddrPortFrom(netip.AddrFrom16(tu.Local.Addr().As16()), tu.Local.Port()),
			Remote: netip.AddrPortFrom(netip.AddrFrom16(tu.Remote.Addr().As16()), tu.Remote.Port()),
		}
	}
	count := func() (int, int) {
		return setLen(t, ns, l.Table(), setV4), setLen(t, ns, l.Table(), setV6)
	}
	for _, step := range []struct {
		name   string
		op     func([]Tuple) error
		ts     []Tuple
		c4, c6 int
	}{
		{"lock v4", l.Lock, v4, n, 0},
		{"lock v6", l.Lock, v6, n, n},
		{"lock again (mapped)", l.Lock, mapped, n, n},
		{"renew", l.Renew, append(slices.Clone(v4), v6...), n, n},
		{"unlock half of v4", l.Unlock, v4[:n/2], n / 2, n},
		{"unlock all v4 (mapped)", l.Unlock, mapped, 0, n},
		{"unlock v4 again", l.Unlock, v4, 0, n},
		{"unlock v6", l.Unlock, v6, 0, 0},
	} {
		start := time.Now()
		if err := step.op(step.ts); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		took := time.Since(start)
		if c4, c6 := count(); c4 != step.c4 || c6 != step.c6 {
			t.Fatalf("after %s: %d v4 and %d v6 elements, want %d and %d", step.name, c4, c6, step.c4, step.c6)
		}
		t.Logf("%s (%d tuples): %v", step.name, len(step.ts), took.Round(time.Microsecond))
	}
}

// TestMirrorAndIdempotence covers the bookkeeping: a tuple and its mirror
// (both ends of a connection on one host) are two elements, each going with
// its own Unlock; a self-connected socket, its own mirror, is one element;
// a tuple named twice in a call counts once; renewing an unlocked tuple
// fails; bad tuples fail the whole call.
func TestMirrorAndIdempotence(t *testing.T) {
	ns := lab.NewTestNS(t, "mirror")
	l := newTestLock(t, Config{Instance: "mirror", NetNS: ns.Handle()})
	tu := Tuple{Local: netip.MustParseAddrPort("198.18.0.2:80"), Remote: netip.MustParseAddrPort("198.18.0.2:40000")}
	mirror := Tuple{Local: tu.Remote, Remote: tu.Local}
	self := Tuple{Local: netip.MustParseAddrPort("198.18.0.2:5000"), Remote: netip.MustParseAddrPort("198.18.0.2:5000")}
	n4 := func() int { return setLen(t, ns, l.Table(), setV4) }

	if err := l.Lock([]Tuple{tu, self, tu, self}); err != nil {
		t.Fatal(err)
	}
	if n := n4(); n != 2 {
		t.Fatalf("%d elements, want 2", n)
	}
	if err := l.Lock([]Tuple{mirror}); err != nil {
		t.Fatal(err)
	}
	if n := n4(); n != 3 {
		t.Fatalf("%d elements, want 3", n)
	}
	if err := l.Unlock([]Tuple{tu}); err != nil {
		t.Fatal(err)
	}
	if n := n4(); n != 2 {
		t.Fatalf("unlocking one end: %d elements left, want the other end's and the self-connected one", n)
	}
	if err := l.Renew([]Tuple{tu}); !errors.Is(err, ErrNotLocked) {
		t.Fatalf("renew of an unlocked tuple: %v", err)
	}
	if err := l.Renew([]Tuple{mirror, self, mirror}); err != nil {
		t.Fatal(err)
	}
	if n := n4(); n != 2 {
		t.Fatalf("%d elements after renew, want 2", n)
	}
	if err := l.Unlock([]Tuple{mirror, self, mirror, tu}); err != nil {
		t.Fatal(err)
	}
	if n := n4(); n != 0 {
		t.Fatalf("%d elements left", n)
	}
	bad := Tuple{Local: tu.Local, Remote: netip.MustParseAddrPort("[fd00::1]:1")}
	err := l.Lock([]Tuple{tu, bad})
	var fe *Error
	if !errors.As(err, &fe) || !errors.Is(err, ErrInvalidTuple) || fe.Op != "lock" || len(fe.Tuples) != 1 {
		t.Fatalf("lock with a bad tuple: %v", err)
	}
	if n := n4(); n != 0 {
		t.Fatalf("a refused call locked %d elements", n)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if err := l.Lock([]Tuple{tu}); !errors.Is(err, ErrClosed) {
		t.Fatalf("lock after close: %v", err)
	}
	if names := tableNames(t, ns); len(names) != 0 {
		t.Fatalf("tables left after close: %v", names)
	}
}

// TestElements reads the elements back from the kernel: one per tuple,
// keyed local·lport·remote·rport as the host sees the connection, mapped
// addresses in v4, and nothing else.
func TestElements(t *testing.T) {
	ns := lab.NewTestNS(t, "elements")
	l := newTestLock(t, Config{Instance: "elements", NetNS: ns.Handle()})
	ts := []Tuple{
		{Local: netip.MustParseAddrPort("198.18.0.2:80"), Remote: netip.MustParseAddrPort("198.18.0.1:40000")},
		{Local: netip.MustParseAddrPort("198.18.0.1:40000"), Remote: netip.MustParseAddrPort("198.18.0.2:80")},
		{Local: netip.MustParseAddrPort("[::ffff:198.18.0.3]:443"), Remote: netip.MustParseAddrPort("[::ffff:198.18.0.4]:50000")},
		{Local: netip.MustParseAddrPort("[fd00::2]:80"), Remote: netip.MustParseAddrPort("[fd00::1]:40000")},
		{Local: netip.MustParseAddrPort("[fe80::1%lo]:22"), Remote: netip.MustParseAddrPort("[fe80::2%lo]:1022")},
	}
	if err := l.Lock(ts); err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{}
	for _, tu := range ts {
		n, _ := tu.normalize()
		want[fmt.Sprintf("%x", connOf(n).appendKey(nil))] = true
	}
	c, err := nftables.New(nftables.WithNetNSFd(ns.Handle()))
	if err != nil {
		t.Fatal(err)
	}
	tab := &nftables.Table{Name: l.Table(), Family: nftables.TableFamilyINet}
	got := map[string]bool{}
	for _, set := range []string{setV4, setV6} {
		els, err := c.GetSetElements(&nftables.Set{Table: tab, Name: set})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range els {
			if wantLen := map[string]int{setV4: keyLen4, setV6: keyLen6}[set]; len(e.Key) != wantLen {
				t.Errorf("set %s: key %x of %d bytes", set, e.Key, len(e.Key))
			}
			if e.Timeout != l.Lease() && e.Timeout != 0 || e.Expires <= 0 || e.Expires > l.Lease() {
				t.Errorf("set %s: key %x: timeout %v, expires %v; want the lease %v", set, e.Key, e.Timeout, e.Expires, l.Lease())
			}
			got[fmt.Sprintf("%x", e.Key)] = true
		}
	}
	if !maps.Equal(got, want) {
		t.Fatalf("elements in the kernel:\n%v\nwant\n%v", slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(want)))
	}
	listing := nftList(t, ns, "set", "inet", l.Table(), setV4)
	for _, e := range []string{"198.18.0.2 . 80 . 198.18.0.1 . 40000", "198.18.0.1 . 40000 . 198.18.0.2 . 80", "198.18.0.3 . 443 . 198.18.0.4 . 50000"} {
		if !strings.Contains(listing, e) {
			t.Errorf("nft does not list %q:\n%s", e, listing)
		}
	}
}

// TestFailedBatch makes batches fail in the kernel and checks that nothing
// of them is applied, that the Lock's bookkeeping stays as it was, and that
// the next batch goes through on a fresh socket.
func TestFailedBatch(t *testing.T) {
	ns := lab.NewTestNS(t, "failed")
	l := newTestLock(t, Config{Instance: "failed", NetNS: ns.Handle()})
	ts := tuples(3, netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.0.1"))
	if err := l.Lock(ts[:2]); err != nil {
		t.Fatal(err)
	}
	// Someone removes one element behind the lock's back: deleting it again
	// fails the whole unlock batch with ENOENT.
	if _, err := ns.Exec("nft", "delete", "element", "inet", l.Table(), setV4,
		"{ 198.18.0.2 . 80 . 198.18.0.1 . 10001 }"); err != nil {
		t.Fatal(err)
	}
	err := l.Unlock(ts)
	var fe *Error
	if !errors.Is(err, unix.ENOENT) || !errors.As(err, &fe) || fe.Op != "unlock" || !strings.Contains(err.Error(), "set v4") {
		t.Fatalf("unlock with an element missing: %v", err)
	}
	if n := setLen(t, ns, l.Table(), setV4); n != 1 {
		t.Fatalf("the failed unlock changed the set: %d elements, want 1", n)
	}
	// Both tuples are still held, so that once the missing element is back
	// one unlock removes both.
	if err := l.Lock(ts[1:2]); err != nil {
		t.Fatal(err)
	}
	if n := setLen(t, ns, l.Table(), setV4); n != 2 {
		t.Fatalf("%d elements after the relock, want 2", n)
	}
	if err := l.Unlock(ts); err != nil {
		t.Fatal(err)
	}
	if n := setLen(t, ns, l.Table(), setV4); n != 0 {
		t.Fatalf("the unlock after the failed one left %d elements", n)
	}
	if err := l.Lock(ts[:2]); err != nil {
		t.Fatal(err)
	}
	// A lock that fails records nothing.
	if _, err := ns.Exec("nft", "delete", "set", "inet", l.Table(), setV6); err == nil {
		t.Fatal("deleting a set the rules use succeeded")
	}
	if _, err := ns.Exec("nft", "flush", "chain", "inet", l.Table(), chainIn); err != nil {
		t.Fatal(err)
	}
	if _, err := ns.Exec("nft", "flush", "chain", "inet", l.Table(), chainOut); err != nil {
		t.Fatal(err)
	}
	if _, err := ns.Exec("nft", "delete", "set", "inet", l.Table(), setV6); err != nil {
		t.Fatal(err)
	}
	v6 := Tuple{Local: netip.MustParseAddrPort("[fd00::2]:80"), Remote: netip.MustParseAddrPort("[fd00::1]:1")}
	if err := l.Lock([]Tuple{ts[2], v6}); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("lock into a missing set: %v", err)
	}
	if n := setLen(t, ns, l.Table(), setV4); n != 2 {
		t.Fatalf("the failed lock changed v4: %d elements, want 2", n)
	}
	if err := l.Renew([]Tuple{ts[2]}); !errors.Is(err, ErrNotLocked) {
		t.Fatalf("renew of a tuple whose lock failed: %v", err)
	}
	if err := l.Unlock(ts); err != nil {
		t.Fatal(err)
	}
	if n := setLen(t, ns, l.Table(), setV4); n != 0 {
		t.Fatalf("%d elements left", n)
	}
}

// TestLeaseExpiryAndRenewal checks that a renewer keeps a lock alive across
// several leases, that without renewal the kernel drops the elements after
// one lease, that Unlock of lapsed tuples succeeds, that Lock of a lapsed
// tuple locks it afresh, and that RenewAll reports (and repairs) a lapse.
func TestLeaseExpiryAndRenewal(t *testing.T) {
	ns := lab.NewTestNS(t, "lease")
	l := newTestLock(t, Config{Instance: "lease", NetNS: ns.Handle(), Lease: MinLease})
	t1 := Tuple{Local: netip.MustParseAddrPort("198.18.0.2:80"), Remote: netip.MustParseAddrPort("198.18.0.1:40000")}
	t2 := Tuple{Local: netip.MustParseAddrPort("[fd00::2]:80"), Remote: netip.MustParseAddrPort("[fd00::1]:40000")}
	t3 := Tuple{Local: netip.MustParseAddrPort("198.18.0.2:80"), Remote: netip.MustParseAddrPort("198.18.0.1:40001")}
	if err := l.Lock([]Tuple{t1, t2, t3}); err != nil {
		t.Fatal(err)
	}
	count := func() int { return setLen(t, ns, l.Table(), setV4) + setLen(t, ns, l.Table(), setV6) }

	if err := l.StartRenewer(0, func(err error) { t.Errorf("renewer: %v", err) }); err != nil {
		t.Fatal(err)
	}
	if err := l.StartRenewer(0, nil); !errors.Is(err, ErrRenewerRunning) {
		t.Fatalf("second renewer: %v", err)
	}
	// Watch the lock for three leases: it must never be missing.
	start := time.Now()
	waitFor(t, 10*time.Second, "three leases to pass with the renewer", func() bool {
		if n := count(); n != 3 {
			t.Fatalf("%d elements after %v with a renewer", n, time.Since(start))
		}
		return time.Since(start) > 3*l.Lease()
	})
	l.StopRenewer()

	expired := time.Now()
	waitFor(t, l.Lease()+2*time.Second, "the elements to expire", func() bool { return count() == 0 })
	gone := time.Now()
	t.Logf("elements expired %v after the renewer stopped (lease %v)", gone.Sub(expired).Round(time.Millisecond), l.Lease())
	// The lock's own view of the deadline is earlier than the kernel's; let
	// the margin pass after the kernel's so that the lock knows for sure.
	waitFor(t, time.Second, "the lease margin to pass", func() bool {
		return time.Since(gone) > leaseMargin
	})

	if err := l.Unlock([]Tuple{t3}); err != nil {
		t.Fatalf("unlock of a lapsed tuple: %v", err)
	}
	if err := l.Lock([]Tuple{t1}); err != nil {
		t.Fatal(err)
	}
	if err := l.Renew([]Tuple{t1}); err != nil {
		t.Fatalf("renew of a tuple locked afresh: %v", err)
	}
	err := l.RenewAll()
	var fe *Error
	if !errors.Is(err, ErrLeaseLapsed) || !errors.As(err, &fe) || len(fe.Tuples) != 1 || fe.Tuples[0] != t2 {
		t.Fatalf("RenewAll after a lapse: %v", err)
	}
	if n := count(); n != 2 {
		t.Fatalf("%d elements after RenewAll, want 2 (t1 and the lapsed t2 locked again)", n)
	}
	if err := l.Renew([]Tuple{t2}); err != nil {
		t.Fatalf("renew right after: %v", err)
	}
}

// TestKilledAgent runs a lock in a child process, SIGKILLs it, and checks
// that the connection stays held until the lease runs out, then flows again
// with every byte and no RST, and that Sweep then removes the dead
// instance's table while leaving a live instance's alone.
func TestKilledAgent(t *testing.T) {
	a, b := newLAN(t)
	ca, cb := dialPair(t, a, b, families[0])
	tu := tupleOf(cb)
	live := newTestLock(t, Config{Instance: "live", NetNS: b.Handle()})
	liveTu := Tuple{Local: netip.MustParseAddrPort("198.18.0.2:1"), Remote: netip.MustParseAddrPort("198.18.0.9:1")}
	if err := live.Lock([]Tuple{liveTu}); err != nil {
		t.Fatal(err)
	}

	const lease = 2 * time.Second
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s dead %v %v %v", childEnv, b.Name, lease, tu.Local, tu.Remote))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	select {
	case line := <-lines(stdout):
		if line != "locked" {
			t.Fatalf("child said %q", line)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("child did not lock in time")
	}
	rstA, rstB := snmp(t, a, "Tcp", "OutRsts"), snmp(t, b, "Tcp", "OutRsts")
	recvB := bytesReceived(t, cb)
	data := pattern(7, 20000)
	write(t, ca, data)
	waitFor(t, 10*time.Second, "the child's lock to drop packets", func() bool {
		in, _ := dropCounts(t, b, TableName("dead"))
		return in >= 1
	})
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	cmd.Wait()
	if got := bytesReceived(t, cb); got != recvB {
		t.Fatalf("b received %d bytes through the child's lock", got-recvB)
	}

	waitFor(t, lease+3*time.Second, "the dead agent's elements to expire", func() bool {
		return setLen(t, b, TableName("dead"), setV4) == 0
	})
	t.Logf("elements gone %v after SIGKILL (lease %v)", time.Since(killed).Round(time.Millisecond), lease)
	readExactly(t, "b", cb, data, 20*time.Second)
	t.Logf("flow resumed %v after SIGKILL", time.Since(killed).Round(time.Millisecond))
	checkHealthy(t, "a", ca)
	checkHealthy(t, "b", cb)
	checkNoRSTs(t, "a", a, rstA)
	checkNoRSTs(t, "b", b, rstB)

	removed, err := Sweep(b.Handle(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(removed, []string{"dead"}) {
		t.Fatalf("Sweep removed %v, want [dead]", removed)
	}
	if names := tableNames(t, b); !slices.Equal(names, []string{live.Table()}) {
		t.Fatalf("tables after the sweep: %v", names)
	}
	if n := setLen(t, b, live.Table(), setV4); n != 1 {
		t.Fatalf("the live instance lost its lock: %d elements", n)
	}
}

// otherRuleset is a host's own firewall: tables of several families, a set,
// a map, counters, a table whose name starts like ours but is not ours, and
// one with our prefix in another family.
const otherRuleset = `table inet filter {
	set blocked {
		type ipv4_addr . inet_service
		flags timeout
		elements = { 198.51.100.1 . 22 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ct state established,related accept
		ip saddr . tcp dport @blocked counter drop
		tcp dport 22 counter accept
	}
	chain output {
		type filter hook output priority raw; policy accept;
		meta mark 0x746d counter accept
	}
}
table ip nat {
	map portmap {
		type inet_service : ipv4_addr
		elements = { 8080 : 198.18.0.1 }
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		dnat to tcp dport map @portmap
	}
}
table inet tcpmigrate {
	chain c {
		type filter hook prerouting priority -300; policy accept;
	}
}
table ip tcpmigrate_ipfamily {
	chain c {
		type filter hook output priority 0; policy accept;
	}
}
`

// TestOthersUntouched checks that two instances never touch each other's
// locks and that the rest of the ruleset is byte for byte what it was,
// during and after their lives, sweeps included.
func TestOthersUntouched(t *testing.T) {
	ns := lab.NewTestNS(t, "others")
	nftScript(t, ns, otherRuleset)
	before := nftList(t, ns, "ruleset")
	others := func() string {
		// Our tables are last in the listing: they were created last.
		s := nftList(t, ns, "ruleset")
		if i := strings.Index(s, "table inet "+TablePrefix); i >= 0 {
			s = s[:i]
		}
		return s
	}

	one := newTestLock(t, Config{Instance: "one", NetNS: ns.Handle()})
	two := newTestLock(t, Config{Instance: "two", NetNS: ns.Handle(), BypassMark: 7})
	shared := tuples(100, netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.0.1"))
	own := tuples(10, netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00::1"))
	for _, step := range []func() error{
		func() error { return one.Lock(shared) },
		func() error { return two.Lock(append(slices.Clone(shared), own...)) },
		func() error { return one.Renew(shared) },
		func() error { return one.Unlock(shared) },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	if n := setLen(t, ns, two.Table(), setV4); n != 100 {
		t.Fatalf("the other instance's lock changed: %d v4 elements, want 100", n)
	}
	if n := setLen(t, ns, two.Table(), setV6); n != 10 {
		t.Fatalf("the other instance's lock changed: %d v6 elements, want 10", n)
	}
	if got := others(); got != before {
		t.Fatalf("the host's ruleset changed while locks were held:\n--- before\n%s\n--- during\n%s", before, got)
	}
	if removed, err := Sweep(ns.Handle(), nil); err != nil || len(removed) != 0 {
		t.Fatalf("Sweep with two live instances removed %v, %v", removed, err)
	}
	if err := one.Close(); err != nil {
		t.Fatal(err)
	}
	if n := setLen(t, ns, two.Table(), setV4); n != 100 {
		t.Fatalf("closing one instance changed the other: %d v4 elements", n)
	}
	if err := two.Close(); err != nil {
		t.Fatal(err)
	}
	if after := nftList(t, ns, "ruleset"); after != before {
		t.Fatalf("the ruleset changed:\n--- before\n%s\n--- after\n%s", before, after)
	}
}

// TestSweep checks whom Sweep removes: tables of instances whose owner is
// gone (a closed owner socket, or a table made by hand), unless keep
// spares them; never a live instance's, nor tables outside the pattern.
func TestSweep(t *testing.T) {
	ns := lab.NewTestNS(t, "sweep")
	nftScript(t, ns, otherRuleset+`table inet tcpmigrate_byhand {
	set v4 {
		type ipv4_addr . inet_service . ipv4_addr . inet_service
		flags timeout
	}
}
`)
	live := newTestLock(t, Config{Instance: "live", NetNS: ns.Handle()})
	var dead []*Lock
	for _, inst := range []string{"dead1", "dead2", "spared"} {
		l, err := New(Config{Instance: inst, NetNS: ns.Handle()})
		if err != nil {
			t.Fatal(err)
		}
		// What the kernel does when the process dies: the owner socket goes.
		unix.Close(l.owner)
		dead = append(dead, l)
	}
	if _, err := New(Config{Instance: "live", NetNS: ns.Handle()}); !errors.Is(err, ErrExists) {
		t.Fatalf("New of a live instance: %v", err)
	}
	if _, err := New(Config{Instance: "dead1", NetNS: ns.Handle()}); !errors.Is(err, ErrExists) {
		t.Fatalf("New over a dead instance's table: %v", err)
	}

	var asked []string
	removed, err := Sweep(ns.Handle(), func(inst string) bool {
		asked = append(asked, inst)
		return inst == "spared"
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"byhand", "dead1", "dead2"}; !slices.Equal(removed, want) {
		t.Fatalf("Sweep removed %v, want %v", removed, want)
	}
	slices.Sort(asked)
	if want := []string{"byhand", "dead1", "dead2", "live", "spared"}; !slices.Equal(asked, want) {
		t.Fatalf("keep was asked about %v, want %v", asked, want)
	}
	names := tableNames(t, ns)
	slices.Sort(names)
	if want := []string{"filter", "tcpmigrate", TableName("live"), TableName("spared")}; !slices.Equal(names, want) {
		t.Fatalf("inet tables after the sweep: %v, want %v", names, want)
	}
	if removed, err := Sweep(ns.Handle(), nil); err != nil || !slices.Equal(removed, []string{"spared"}) {
		t.Fatalf("second sweep removed %v, %v", removed, err)
	}
	if removed, err := Sweep(ns.Handle(), nil); err != nil || len(removed) != 0 {
		t.Fatalf("third sweep removed %v, %v", removed, err)
	}
	if err := live.Lock(tuples(1, netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.0.1"))); err != nil {
		t.Fatalf("the live lock after sweeps: %v", err)
	}
	// The dead instances' name is free again, and their Close, if they
	// had one left, finds nothing to delete.
	for _, l := range dead {
		l.owner = -1
		if err := l.Close(); err != nil {
			t.Fatalf("close after the sweep: %v", err)
		}
	}
	again := newTestLock(t, Config{Instance: "dead1", NetNS: ns.Handle()})
	if err := again.Lock(tuples(1, netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.0.1"))); err != nil {
		t.Fatal(err)
	}
}

// TestCurrentNamespace checks that NetNS 0 pins the namespace of the thread
// that calls New, even when later calls come from other threads.
func TestCurrentNamespace(t *testing.T) {
	ns := lab.NewTestNS(t, "current")
	var l *Lock
	if err := ns.Do(func() error {
		var err error
		l, err = New(Config{Instance: "current"})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ts := tuples(3, netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.0.1"))
	if err := l.Lock(ts); err != nil {
		t.Fatal(err)
	}
	if n := setLen(t, ns, l.Table(), setV4); n != 3 {
		t.Fatalf("%d elements in the namespace of New, want 3", n)
	}
	if removed, err := func() (r []string, err error) {
		err = ns.Do(func() error {
			var err error
			r, err = Sweep(0, nil)
			return err
		})
		return r, err
	}(); err != nil || len(removed) != 0 {
		t.Fatalf("Sweep(0) in the namespace removed %v, %v", removed, err)
	}
}

// TestConcurrentUse locks and unlocks from several goroutines while the
// renewer runs; run with -race it checks the locking of the bookkeeping.
func TestConcurrentUse(t *testing.T) {
	ns := lab.NewTestNS(t, "concurrent")
	l := newTestLock(t, Config{Instance: "concurrent", NetNS: ns.Handle(), Lease: MinLease})
	if err := l.StartRenewer(50*time.Millisecond, func(err error) { t.Errorf("renewer: %v", err) }); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 4)
	for g := range 4 {
		go func() {
			ts := tuples(100, netip.AddrFrom4([4]byte{198, 18, 0, byte(g + 1)}), netip.MustParseAddr("198.18.1.1"))
			for range 20 {
				if err := l.Lock(ts); err != nil {
					errc <- err
					return
				}
				if err := l.Unlock(ts); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
	}
	for range 4 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	l.StopRenewer()
	if n := setLen(t, ns, l.Table(), setV4); n != 0 {
		t.Fatalf("%d elements left", n)
	}
}
