package repair

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"io"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// TestSegmentKnownPackets builds segments equal to RSTs the kernel sent
// (captured with tcpdump on a namespace's loopback) and compares the bytes,
// checksums included.
func TestSegmentKnownPackets(t *testing.T) {
	// 198.18.5.1.81 > 198.18.5.1.40001: Flags [R.], seq 0, ack 3344028804,
	// win 0; tcpdump: "cksum 0xe140 (correct)".
	want4, _ := hex.DecodeString("45000028000040004006a4a9c6120501c6120501" +
		"00519c4100000000c751d48450140000e1400000")
	seg := Segment{
		From:  netip.MustParseAddrPort("198.18.5.1:81"),
		To:    netip.MustParseAddrPort("198.18.5.1:40001"),
		Ack:   3344028804,
		Flags: SegRST | SegACK,
	}
	var b [ipv6HeaderLen + tcpHeaderLen]byte
	n := buildSegment4(b[:], seg.From.Addr(), seg.To.Addr(), &seg)
	if !bytes.Equal(b[:n], want4) {
		t.Errorf("IPv4 segment\n got %x\nwant %x", b[:n], want4)
	}

	// [fd00::5:1]:81 > [fd00::5:1]:40002: Flags [R.], seq 0, ack 759212118,
	// win 0. On loopback the kernel leaves the checksum partial; tcpdump
	// computed the correct one, 0x4399. The flow label (6009beaf) is the
	// kernel's choice; crafted segments have none.
	want6, _ := hex.DecodeString("60000000" + "00140640" +
		"fd000000000000000000000000050001" + "fd000000000000000000000000050001" +
		"00519c42000000002d40a85650140000" + "43990000")
	seg = Segment{
		From:  netip.MustParseAddrPort("[fd00::5:1]:81"),
		To:    netip.MustParseAddrPort("[fd00::5:1]:40002"),
		Ack:   759212118,
		Flags: SegRST | SegACK,
	}
	n = buildSegment6(b[:], seg.From.Addr(), seg.To.Addr(), &seg)
	if !bytes.Equal(b[:n], want6) {
		t.Errorf("IPv6 segment\n got %x\nwant %x", b[:n], want6)
	}

	// An odd number of bytes is padded with a zero byte (RFC 1071).
	if got := fold(sum(0, []byte{0x01, 0x02, 0x03})); got != 0x0402 {
		t.Errorf("sum of 01 02 03 = %#x, want 0x402", got)
	}
}

func TestSegmentFlagsString(t *testing.T) {
	for f, want := range map[SegmentFlags]string{
		SegFIN | SegACK: "F.", SegACK: ".", SegSYN: "S", SegRST | SegACK: "R.", 0: "none", 0x40: "+0x40",
	} {
		if got := f.String(); got != want {
			t.Errorf("%#x: %q, want %q", uint8(f), got, want)
		}
	}
}

// TestInjectThroughLock establishes a connection, locks it in nftables with
// a table that accepts only the injector's mark, and injects a FIN from the
// peer's address. A segment carrying another mark is dropped by the lock
// (its counter moves, the socket stays ESTABLISHED); the marked one passes
// and the socket goes to CLOSE_WAIT and reads EOF. Send allocates nothing.
func TestInjectThroughLock(t *testing.T) {
	for _, tc := range []struct {
		name   string
		v6     bool
		family int
	}{
		{"ipv4", false, unix.AF_INET},
		{"ipv6", true, unix.AF_INET6},
		{"ipv4-mapped", false, unix.AF_INET6},
	} {
		t.Run(tc.name, func(t *testing.T) { testInjectThroughLock(t, tc.v6, tc.family) })
	}
}

func testInjectThroughLock(t *testing.T, v6 bool, family int) {
	const mark = 0x746d
	h := newHosts(t, v6)
	peerAP := netip.AddrPortFrom(h.peerAddr, peerPort)
	local := netip.AddrPortFrom(h.svc, 40001)
	src, pc := dialPeer(t, h, family, local, peerAP, nil, nil)
	defer src.Close()
	defer pc.Close()
	// Some data both ways, so that the sequence numbers have moved.
	if _, err := pc.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(src, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Write([]byte("world!")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(pc, make([]byte, 6)); err != nil {
		t.Fatal(err)
	}
	fd := fdOf(t, src)
	waitFor(t, "the source's send queue to drain", 5*time.Second, func() bool {
		n, _ := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
		return n == 0
	})

	markLock(t, h.src, local, peerAP, mark)
	var snap Snapshot
	err := h.src.Do(func() error {
		if err := Dump(fd, &snap); err != nil {
			return err
		}
		return resume(fd, &snap, repairOffQuiet())
	})
	if err != nil {
		t.Fatal(err)
	}
	fin := Segment{From: snap.Remote, To: snap.Local, Seq: snap.RecvSeq, Ack: snap.SendSeq, Flags: SegFIN | SegACK, Window: 1000}

	marked, other := newInjector(t, h.src, mark), newInjector(t, h.src, mark+1)

	// Another mark: dropped by the lock.
	if err := other.Send(fin); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the lock to drop the unmarked FIN", 5*time.Second, func() bool { return lockDrops(t, h.src) == 1 })
	if st := tcpStateOf(t, fd); st != StateEstablished {
		t.Fatalf("after a FIN the lock dropped: state %s, want ESTABLISHED", st)
	}
	allocs := testing.AllocsPerRun(100, func() {
		if err := other.Send(fin); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("Send allocates %.1f times per call, want 0", allocs)
	}
	waitFor(t, "the lock to drop every unmarked FIN", 5*time.Second, func() bool { return lockDrops(t, h.src) == 102 })

	// The bypass mark: the socket receives it.
	if err := marked.Send(fin); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the socket to take the injected FIN", 5*time.Second, func() bool { return tcpStateOf(t, fd) == StateCloseWait })
	src.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := src.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read after the injected FIN: %d bytes, %v; want EOF", n, err)
	}
	if d := lockDrops(t, h.src); d != 102 {
		t.Errorf("the lock dropped %d inbound segments, want 102 (the marked FIN passed)", d)
	}

	// Errors name the operation and the connection.
	bad := fin
	bad.From = netip.AddrPort{}
	if err := marked.Send(bad); err == nil || !strings.Contains(err.Error(), "inject segment") || !strings.Contains(err.Error(), snap.Local.String()) {
		t.Errorf("mixed families: %v", err)
	}
	marked.Close()
	if err := marked.Send(fin); err == nil {
		t.Error("Send after Close succeeded")
	}
}

// markLock drops the connection's packets on a host, except those carrying
// mark, with a test-only table whose drop rules count.
func markLock(t *testing.T, ns *lab.NS, local, remote netip.AddrPort, mark uint32) {
	t.Helper()
	nftScript(t, ns, lockTable("segtest", local, remote, true, true, fmt.Sprintf("meta mark %#x accept", mark)))
}

var packetsRE = regexp.MustCompile(`packets (\d+)`)

// lockDrops returns the packets the inbound rule of markLock's table dropped.
func lockDrops(t *testing.T, ns *lab.NS) int {
	t.Helper()
	out, err := ns.Exec("nft", "list", "chain", "inet", "segtest", "pre")
	if err != nil {
		t.Fatalf("nft list: %v: %s", err, out)
	}
	m := packetsRE.FindSubmatch(out)
	if m == nil {
		t.Fatalf("no counter in %s", out)
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}
