package repair

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
)

// stateEnv is one connection between the peer and the source host, driven
// into a TCP state before it moves to the target host.
type stateEnv struct {
	t              *testing.T
	h              *hosts
	local, peerAP  netip.AddrPort
	src, peer      *net.TCPConn
	srcFd, peerFd  int
	toSrc, fromSrc int64 // bytes the peer and the source have written
}

func (e *stateEnv) peerWrite(n int64) {
	e.t.Helper()
	if err := writeStream(e.peer, 1, e.toSrc, n); err != nil {
		e.t.Fatal(err)
	}
	e.toSrc += n
}

// srcWrite writes n bytes on the source socket; they fit in its buffers.
func (e *stateEnv) srcWrite(n int64) {
	e.t.Helper()
	e.src.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if err := writeStream(e.src, 0, e.fromSrc, n); err != nil {
		e.t.Fatal(err)
	}
	e.fromSrc += n
}

func (e *stateEnv) srcShutdown() {
	e.t.Helper()
	if err := unix.Shutdown(e.srcFd, unix.SHUT_WR); err != nil {
		e.t.Fatal(err)
	}
}

func (e *stateEnv) peerShutdown() {
	e.t.Helper()
	if err := e.peer.CloseWrite(); err != nil {
		e.t.Fatal(err)
	}
}

// srcHas waits until the source's receive queue holds everything the
// peer wrote.
func (e *stateEnv) srcHas() {
	e.t.Helper()
	waitFor(e.t, "the peer's bytes in the source's receive queue", 5*time.Second, func() bool {
		n, _ := unix.IoctlGetInt(e.srcFd, unix.SIOCINQ)
		return int64(n) == e.toSrc
	})
}

// srcSentAll waits until the source has transmitted everything, FIN
// included.
func (e *stateEnv) srcSentAll() {
	e.t.Helper()
	waitFor(e.t, "the source to send everything", 5*time.Second, func() bool {
		n, _ := unix.IoctlGetInt(e.srcFd, unix.SIOCOUTQNSD)
		return n == 0
	})
}

// lockSrc drops the connection's packets on the source host in the given
// directions (a test-only table; the target uses the real lock).
func (e *stateEnv) lockSrc(in, out bool) {
	e.t.Helper()
	nftLock(e.t, e.h.src, e.local, e.peerAP, in, out)
}

// stateCase drives a connection into a state (prepare, which ends with
// the source locked both ways) and says what the migrated connection must
// do: whether our FIN must show up on the wire after the lock (the peer
// had not acknowledged it), and the rest of the conversation (finish).
type stateCase struct {
	name    string
	state   State
	ourFin  bool // our FIN must be (re)transmitted by the target
	prepare func(e *stateEnv)
	finish  func(e *stateEnv, c *net.TCPConn)
}

// The data the tests queue: the receive queue of the moving socket always
// holds unread bytes; the send queue holds sent-unacknowledged or never-sent
// bytes where the state allows it.
const (
	recvBytes = 30000
	sendBytes = 20000
	moreBytes = 10000
	// initialWindowBytes fit in the initial congestion window (10
	// segments): they all go out though no ACK comes back.
	initialWindowBytes = 8000
)

var stateCases = []stateCase{
	{
		name: "fin-wait1", state: StateFinWait1, ourFin: true,
		// Data and FIN written under the lock: the peer has neither.
		prepare: func(e *stateEnv) {
			e.srcReceived()
			e.srcClosesLocked(StateFinWait1)
		},
		finish: peerReadsThenFinishes,
	},
	{
		name: "fin-wait1-fin-delivered", state: StateFinWait1,
		// Data and FIN reached the peer; its acknowledgements did not.
		prepare: func(e *stateEnv) {
			e.srcReceived()
			e.srcClosesUnacknowledged(StateFinWait1)
		},
		finish: peerReadsThenFinishes,
	},
	{
		name: "fin-wait2", state: StateFinWait2,
		// Our FIN acknowledged; the peer goes on writing.
		prepare: func(e *stateEnv) {
			e.srcWrite(sendBytes)
			e.srcShutdown()
			e.peerReadsAllThenEOF()
			waitTCPState(e.t, e.srcFd, StateFinWait2)
			e.srcReceived()
			e.lockSrc(true, true)
		},
		finish: peerFinishes,
	},
	{
		name: "closing", state: StateClosing, ourFin: true,
		// Simultaneous close: the peer's data and FIN arrive, ours are
		// dropped on the way out.
		prepare: func(e *stateEnv) {
			e.srcReceived()
			e.lockSrc(false, true)
			e.srcWrite(sendBytes)
			e.srcShutdown()
			e.peerShutdown()
			waitTCPState(e.t, e.srcFd, StateClosing)
			e.lockSrc(true, false) // and now the way in, without a gap
		},
		finish: func(e *stateEnv, c *net.TCPConn) {
			e.targetReadsAllThenEOF(c)
			e.peerReadsAllThenEOF()
			waitTCPState(e.t, e.peerFd, StateClose) // through CLOSING and TIME_WAIT
		},
	},
	{
		name: "close-wait", state: StateCloseWait,
		// The peer closed; our data reached it but its ACKs did not.
		prepare: func(e *stateEnv) {
			e.peerCloses()
			e.lockSrc(true, false)
			e.srcWrite(sendBytes)
			e.lockSrc(false, true) // and now the way out, without a gap
		},
		finish: func(e *stateEnv, c *net.TCPConn) {
			e.targetReadsAllThenEOF(c)
			c.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if err := writeStream(c, 0, e.fromSrc, moreBytes); err != nil {
				e.t.Fatal("target write in CLOSE_WAIT: ", err)
			}
			e.fromSrc += moreBytes
			if err := c.CloseWrite(); err != nil {
				e.t.Fatal(err)
			}
			e.peerReadsAllThenEOF()
			waitTCPState(e.t, fdOf(e.t, c), StateClose) // LAST_ACK acknowledged
		},
	},
	{
		name: "last-ack", state: StateLastAck, ourFin: true,
		// The peer closed; our data and FIN were written under the lock.
		prepare: func(e *stateEnv) {
			e.peerCloses()
			e.srcClosesLocked(StateLastAck)
		},
		finish: bothReadAll,
	},
	{
		name: "last-ack-fin-delivered", state: StateLastAck,
		// The peer closed; our data and FIN reached it, its ACKs did not.
		prepare: func(e *stateEnv) {
			e.peerCloses()
			e.srcClosesUnacknowledged(StateLastAck)
		},
		finish: bothReadAll,
	},
	{
		name: "close", state: StateClose,
		// Both FINs exchanged and acknowledged, received bytes unread.
		prepare: func(e *stateEnv) {
			e.peerCloses()
			e.srcShutdown()
			waitTCPState(e.t, e.srcFd, StateClose)
			e.peerReadsAllThenEOF()
			e.lockSrc(true, true)
		},
		finish: func(e *stateEnv, c *net.TCPConn) { e.targetClosed(c) },
	},
	{
		name: "close-after-reset", state: StateClose,
		// The peer reset the connection with bytes unread at the source:
		// they come back readable, then end-of-file (not ECONNRESET).
		prepare: func(e *stateEnv) {
			e.srcReceived()
			if err := e.peer.SetLinger(0); err != nil {
				e.t.Fatal(err)
			}
			e.peer.Close()
			waitTCPState(e.t, e.srcFd, StateClose)
			e.lockSrc(true, true)
		},
		finish: func(e *stateEnv, c *net.TCPConn) { e.targetClosed(c) },
	},
}

// srcReceived has the peer write recvBytes, left unread in the source's
// receive queue.
func (e *stateEnv) srcReceived() {
	e.t.Helper()
	e.peerWrite(recvBytes)
	e.srcHas()
}

// peerCloses is srcReceived with the peer's FIN after the bytes: the
// source ends in CLOSE_WAIT.
func (e *stateEnv) peerCloses() {
	e.t.Helper()
	e.peerWrite(recvBytes)
	e.peerShutdown()
	e.srcHas()
	waitTCPState(e.t, e.srcFd, StateCloseWait)
}

// srcClosesLocked locks the source both ways, then writes sendBytes and
// shuts its side down, which takes it to state want: the peer gets
// neither the bytes nor the FIN.
func (e *stateEnv) srcClosesLocked(want State) {
	e.t.Helper()
	e.lockSrc(true, true)
	e.srcWrite(sendBytes)
	e.srcShutdown()
	waitTCPState(e.t, e.srcFd, want)
}

// srcClosesUnacknowledged is srcClosesLocked with the bytes and the FIN
// delivered and the peer's acknowledgements dropped: only the way in is
// locked until they have left, then the way out too, without a gap.
func (e *stateEnv) srcClosesUnacknowledged(want State) {
	e.t.Helper()
	e.lockSrc(true, false)
	e.srcWrite(initialWindowBytes) // all of it leaves without an ACK
	e.srcShutdown()
	e.srcSentAll()
	waitTCPState(e.t, e.srcFd, want)
	e.lockSrc(false, true)
}

// peerFinishes has the peer write moreBytes and close; the moved socket
// reads everything then end-of-file, and acknowledges the peer's FIN.
func peerFinishes(e *stateEnv, c *net.TCPConn) {
	e.peerWrite(moreBytes)
	e.peerShutdown()
	e.targetReadsAllThenEOF(c)
	waitTCPState(e.t, e.peerFd, StateClose) // LAST_ACK acknowledged
}

// peerReadsThenFinishes is peerFinishes after the peer has read every byte
// and our FIN.
func peerReadsThenFinishes(e *stateEnv, c *net.TCPConn) {
	e.peerReadsAllThenEOF()
	peerFinishes(e, c)
}

// bothReadAll: both ends read every byte and end-of-file, and the moved
// socket's LAST_ACK is acknowledged.
func bothReadAll(e *stateEnv, c *net.TCPConn) {
	e.peerReadsAllThenEOF()
	e.targetReadsAllThenEOF(c)
	waitTCPState(e.t, fdOf(e.t, c), StateClose)
}

// peerReadsAllThenEOF checks every byte the source wrote, then end-of-file.
func (e *stateEnv) peerReadsAllThenEOF() {
	e.t.Helper()
	e.peer.SetReadDeadline(time.Now().Add(20 * time.Second))
	if err := checkStream(e.peer, 0, 0, e.fromSrc); err != nil {
		e.t.Fatal("peer: ", err)
	}
	wantEOF(e.t, "peer", e.peer)
}

// targetReadsAllThenEOF checks every byte the peer wrote, then end-of-file.
func (e *stateEnv) targetReadsAllThenEOF(c *net.TCPConn) {
	e.t.Helper()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	if err := checkStream(c, 1, 0, e.toSrc); err != nil {
		e.t.Fatal("target: ", err)
	}
	wantEOF(e.t, "target", c)
}

// targetClosed checks a restored CLOSE connection: bytes, end-of-file,
// and writes refused.
func (e *stateEnv) targetClosed(c *net.TCPConn) {
	e.t.Helper()
	e.targetReadsAllThenEOF(c)
	if _, err := c.Write([]byte("x")); !errors.Is(err, unix.EPIPE) {
		e.t.Errorf("write on a restored CLOSE socket: %v, want EPIPE", err)
	}
	if st := tcpStateOf(e.t, fdOf(e.t, c)); st != StateClose {
		e.t.Errorf("restored socket in %s, want CLOSE", st)
	}
}

func wantEOF(t *testing.T, who string, c *net.TCPConn) {
	t.Helper()
	var b [1]byte
	if n, err := c.Read(b[:]); n != 0 || err != io.EOF {
		t.Fatalf("%s: read after the data = %d, %v; want end-of-file", who, n, err)
	}
}

func tcpStateOf(t *testing.T, fd int) State {
	t.Helper()
	st, err := readState(fd)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func waitTCPState(t *testing.T, fd int, want State) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := tcpStateOf(t, fd)
		if st == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket in %s, want %s", st, want)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestHalfClosedStates moves a connection in each half-closed state, with
// data queued, from the source host to the target host: dumped under a lock,
// closed silently at the source, restored under the target's real lock
// (firewall package, crafted segments passing with its bypass mark),
// unlocked and resumed. The peer, the kernel's own stack, then checks the
// bytes, end-of-file where the state implies it, that our unacknowledged
// FIN reaches it (bridge capture) and is acknowledged (states on both sides
// via TCP_INFO), and that nobody sent a reset (capture and the peer's
// counters). IPv4 connections are restored before the service address
// moves (the crafted segments wait for Settle), IPv6 ones after it.
func TestHalfClosedStates(t *testing.T) {
	for _, fam := range []struct {
		name   string
		v6     bool
		family int
		only   []string
	}{
		{"ipv4", false, unix.AF_INET, nil},
		{"ipv6", true, unix.AF_INET6, nil},
		{"ipv4-mapped", false, unix.AF_INET6, []string{"fin-wait2", "last-ack"}},
	} {
		for _, sc := range stateCases {
			if fam.only != nil && !contains(fam.only, sc.name) {
				continue
			}
			t.Run(fam.name+"/"+sc.name, func(t *testing.T) { testState(t, fam.v6, fam.family, sc) })
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func testState(t *testing.T, v6 bool, family int, sc stateCase) {
	h := newHosts(t, v6)
	e := &stateEnv{t: t, h: h, peerAP: netip.AddrPortFrom(h.peerAddr, peerPort), local: netip.AddrPortFrom(h.svc, 40001)}
	ln := listen(t, h.peer, e.peerAP, nil)
	e.src = rawDial(t, h.src, family, e.local, e.peerAP, nil)
	defer e.src.Close()
	pc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	e.peer = pc.(*net.TCPConn)
	defer e.peer.Close()
	e.srcFd, e.peerFd = fdOf(t, e.src), fdOf(t, e.peer)

	sc.prepare(e) // ends with the source locked both ways
	stopCapture := captureFlags(t, h.lan, peerPort, v6)
	before := tcpCounters(t, h.peer)

	var snap Snapshot
	if err := h.src.Do(func() error { return Dump(e.srcFd, &snap) }); err != nil {
		t.Fatal(err)
	}
	t.Logf("dumped %s: recvq %d sendq %d (unsent %d) rcv_nxt %d write_seq %d shutdown %d",
		snap.State, len(snap.RecvQueue), len(snap.SendQueue), snap.Unsent, snap.RecvSeq, snap.SendSeq, snap.Shutdown)
	if snap.State != sc.state {
		t.Fatalf("dumped state %s, want %s", snap.State, sc.state)
	}
	if len(snap.RecvQueue) != recvBytes {
		t.Fatalf("receive queue %d bytes, want %d", len(snap.RecvQueue), recvBytes)
	}
	if err := checkBytes(snap.RecvQueue, 1, 0); err != nil {
		t.Fatal("receive queue: ", err)
	}
	if err := checkBytes(snap.SendQueue, 0, e.fromSrc-int64(len(snap.SendQueue))); err != nil {
		t.Fatal("send queue: ", err)
	}
	if err := Discard(dupFd(t, e.srcFd)); err != nil {
		t.Fatal(err)
	}
	e.src.Close()

	// The target: the real lock, an injector with its bypass mark.
	lock := newLock(t, h.dst, "states", false)
	l, r := snap.Tuple()
	if err := lock.Lock([]firewall.Tuple{{Local: l, Remote: r}}); err != nil {
		t.Fatal(err)
	}
	rs := Restorer{Injector: newInjector(t, h.dst, lock.BypassMark())}
	early := !v6 // restore before the address is on the target
	if !early {
		h.moveService(t)
	}
	var fd int
	if err := h.dst.Do(func() (err error) { fd, err = rs.Restore(&snap); return err }); err != nil {
		t.Fatal(err)
	}
	if early {
		if st := tcpStateOf(t, fd); snap.State.NeedsInjection() && st == snap.State {
			t.Errorf("restored to %s before the address is local: the crafted segments cannot have reached it", st)
		}
		h.moveService(t)
		if err := rs.Settle(fd, &snap); err != nil {
			t.Fatal(err)
		}
	}
	if st := tcpStateOf(t, fd); st != snap.State {
		t.Fatalf("restored socket in %s, want %s", st, snap.State)
	}
	wantNoQueue(t, fd)
	if err := lock.Unlock([]firewall.Tuple{{Local: l, Remote: r}}); err != nil {
		t.Fatal(err)
	}
	if err := rs.Resume(fd, &snap); err != nil {
		t.Fatal(err)
	}
	restored := restoredConn(t, fd)
	defer restored.Close()

	sc.finish(e, restored)
	// Every FIN was acknowledged: both ends are closed (through TIME_WAIT
	// on the side that closed first).
	waitTCPState(t, fdOf(t, restored), StateClose)
	if sc.name != "close-after-reset" { // that peer closed its socket
		waitTCPState(t, e.peerFd, StateClose)
	}

	segs := stopCapture()
	ourFin := fmt.Sprintf("%s.%d > %s.%d: Flags [F", l.Addr(), l.Port(), r.Addr(), r.Port())
	sawFin := false
	for _, s := range segs {
		if strings.Contains(s, "Flags [R") {
			t.Errorf("capture saw a reset: %s", s)
		}
		sawFin = sawFin || strings.Contains(s, ourFin)
	}
	if sc.ourFin && !sawFin {
		t.Errorf("our FIN never reached the peer after the lock; capture:\n%s", strings.Join(segs, "\n"))
	}
	wantPeerNoReset(t, h, before)
	wantNoChallengeACK(t, h)
	nftUnlock(t, h.src)
}

// TestSynSent moves a connection whose SYN the peer never saw (the source
// was locked before it connected). After the target resumes it, the peer's
// listener accepts it; the peer's own rcv_nxt (read under repair) shows the
// original initial sequence number, the restored socket's timestamp clock
// continues the source's, and bytes flow both ways.
func TestSynSent(t *testing.T) {
	for _, fam := range []struct {
		name   string
		v6     bool
		family int
	}{{"ipv4", false, unix.AF_INET}, {"ipv6", true, unix.AF_INET6}} {
		t.Run(fam.name, func(t *testing.T) { testSynSent(t, fam.v6, fam.family) })
	}
}

func testSynSent(t *testing.T, v6 bool, family int) {
	h := newHosts(t, v6)
	peerAP := netip.AddrPortFrom(h.peerAddr, peerPort)
	local := netip.AddrPortFrom(h.svc, 40001)
	ln := listen(t, h.peer, peerAP, nil)
	before := tcpCounters(t, h.peer)
	stopCapture := captureFlags(t, h.lan, peerPort, v6)

	nftLock(t, h.src, local, peerAP, true, true)
	var srcFd int
	if err := h.src.Do(func() (err error) {
		if srcFd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		if err := unix.Bind(srcFd, sockaddr(family, local)); err != nil {
			return err
		}
		if err := unix.Connect(srcFd, sockaddr(family, peerAP)); !errors.Is(err, unix.EINPROGRESS) {
			return fmt.Errorf("connect: %v, want EINPROGRESS", err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	waitTCPState(t, srcFd, StateSynSent)
	// Move the source's timestamp clock far from the target's (on one
	// machine both hosts share the clock and the offset secret, which
	// would hide a restore that loses it).
	var shifted uint32
	if err := h.src.Do(func() error {
		if err := unix.SetsockoptInt(srcFd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1); err != nil {
			return err
		}
		ts, err := unix.GetsockoptInt(srcFd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP)
		if err != nil {
			return err
		}
		shifted = (uint32(ts) + 1<<30) &^ 1
		if err := unix.SetsockoptInt(srcFd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP, int(int32(shifted))); err != nil {
			return err
		}
		return unix.SetsockoptInt(srcFd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 0)
	}); err != nil {
		t.Fatal(err)
	}
	var snap Snapshot
	if err := h.src.Do(func() error { return Dump(srcFd, &snap) }); err != nil {
		t.Fatal(err)
	}
	isn := snap.SendSeq - 1
	if snap.State != StateSynSent || snap.Remote.Port() != peerPort {
		t.Fatalf("dumped %s to %s", snap.State, snap.Remote)
	}
	if err := Discard(srcFd); err != nil {
		t.Fatal(err)
	}

	lock := newLock(t, h.dst, "synsent", false)
	l, r := snap.Tuple()
	if err := lock.Lock([]firewall.Tuple{{Local: l, Remote: r}}); err != nil {
		t.Fatal(err)
	}
	var fd int
	var rs Restorer
	if err := h.dst.Do(func() (err error) { fd, err = rs.Restore(&snap); return err }); err != nil {
		t.Fatal(err)
	}
	h.moveService(t)
	start := time.Now()
	if err := lock.Unlock([]firewall.Tuple{{Local: l, Remote: r}}); err != nil {
		t.Fatal(err)
	}
	if err := rs.Resume(fd, &snap); err != nil {
		t.Fatal(err)
	}
	restored := restoredConn(t, fd)
	defer restored.Close()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
	pc, err := ln.Accept()
	if err != nil {
		t.Fatal("peer's listener: ", err)
	}
	t.Logf("peer accepted %v after the unlock (the SYN timer retransmits)", time.Since(start))
	peer := pc.(*net.TCPConn)
	defer peer.Close()
	pfd := fdOf(t, peer)
	// The peer's rcv_nxt is the ISN it saw plus one (nothing received yet).
	if err := h.peer.Do(func() error {
		if err := unix.SetsockoptInt(pfd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1); err != nil {
			return err
		}
		defer unix.SetsockoptInt(pfd, unix.IPPROTO_TCP, unix.TCP_REPAIR, -1)
		if err := unix.SetsockoptInt(pfd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue); err != nil {
			return err
		}
		seq, err := unix.GetsockoptInt(pfd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ)
		if err != nil {
			return err
		}
		if got := uint32(seq) - 1; got != isn {
			return fmt.Errorf("peer saw ISN %d, the source chose %d", got, isn)
		}
		return unix.SetsockoptInt(pfd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue)
	}); err != nil {
		t.Fatal(err)
	}
	waitTCPState(t, fdOf(t, restored), StateEstablished)
	// The restored socket goes on with the source's clock.
	rfd := fdOf(t, restored)
	if err := unix.SetsockoptInt(rfd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1); err != nil {
		t.Fatal(err)
	}
	ts, err := unix.GetsockoptInt(rfd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptInt(rfd, unix.IPPROTO_TCP, unix.TCP_REPAIR, -1); err != nil {
		t.Fatal(err)
	}
	if d := uint32(ts) - shifted; d > 60_000 {
		t.Errorf("restored timestamp clock %d, the source's was %d", uint32(ts), shifted)
	}
	// Bytes both ways.
	const n = 1 << 20
	errs := make(chan error, 4)
	deadline := time.Now().Add(20 * time.Second)
	restored.SetDeadline(deadline)
	peer.SetDeadline(deadline)
	go func() { errs <- writeStream(restored, 0, 0, n) }()
	go func() { errs <- writeStream(peer, 1, 0, n) }()
	go func() { errs <- checkStream(restored, 1, 0, n) }()
	go func() { errs <- checkStream(peer, 0, 0, n) }()
	for range 4 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	for _, s := range stopCapture() {
		if strings.Contains(s, "Flags [R") {
			t.Errorf("capture saw a reset: %s", s)
		}
	}
	wantPeerNoReset(t, h, before)
	wantNoChallengeACK(t, h)
	nftUnlock(t, h.src)
}
