package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/source"
	"github.com/tcpmigrate/tcpmigrate/target"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// mixConn is one connection of TestHalfClosedMix: the peer's side, the
// workload's side on the source host, and the bytes each has written.
type mixConn struct {
	state          repair.State
	peer, work     *net.TCPConn
	toWork, toPeer int // bytes written by the peer and by the workload
	dropAcks       bool
}

// mixData is the stream of one direction: every byte depends on its
// offset and the direction, so a lost or repeated byte shows.
func mixData(dir byte, off, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		x := uint32(off+i)*2654435761 + uint32(dir)*97
		b[i] = byte(x >> 24)
	}
	return b
}

func (c *mixConn) peerWrite(t *testing.T, n int) {
	t.Helper()
	if _, err := c.peer.Write(mixData(1, c.toWork, n)); err != nil {
		t.Fatal(err)
	}
	c.toWork += n
}

func (c *mixConn) workWrite(t *testing.T, w *net.TCPConn, n int) {
	t.Helper()
	w.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := w.Write(mixData(0, c.toPeer, n)); err != nil {
		t.Fatalf("%s: workload write: %v", c.state, err)
	}
	c.toPeer += n
}

// readAll reads want bytes of direction dir from r from offset 0 and then
// insists on end-of-file.
func readAll(r *net.TCPConn, dir byte, want int) error {
	r.SetReadDeadline(time.Now().Add(20 * time.Second))
	got := make([]byte, want)
	if _, err := io.ReadFull(r, got); err != nil {
		return fmt.Errorf("read %d bytes: %w", want, err)
	}
	if !bytes.Equal(got, mixData(dir, 0, want)) {
		return fmt.Errorf("bytes differ")
	}
	if n, err := r.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		return fmt.Errorf("after %d bytes: read %d, %v; want end-of-file", want, n, err)
	}
	return nil
}

func stateOf(t *testing.T, c *net.TCPConn) repair.State {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	rc.Control(func(fd uintptr) { info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if err != nil {
		t.Fatal(err)
	}
	return repair.State(info.State)
}

func waitConnState(t *testing.T, what string, c *net.TCPConn, want repair.State) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for st := stateOf(t, c); st != want; st = stateOf(t, c) {
		if time.Now().After(deadline) {
			t.Fatalf("%s in %s, want %s", what, st, want)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestHalfClosedMix migrates, through both agents (Go API), a mix of
// connections in ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK and
// CLOSE, each with unread bytes queued at the workload, over IPv4 and IPv6.
// FIN_WAIT1 and LAST_ACK are held by dropping the peer's acknowledgements
// (a lossy path) until after the commit. The peer then judges: every byte
// and end-of-file where the state implies it, on both sides; its own FIN
// acknowledged and the workload's FIN received (TCP states read from
// TCP_INFO); no reset counted by the peer and none on the bridge.
func TestHalfClosedMix(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		name := "ipv4"
		if v6 {
			name = "ipv6"
		}
		t.Run(name, func(t *testing.T) { testHalfClosedMix(t, v6) })
	}
}

func testHalfClosedMix(t *testing.T, v6 bool) {
	lan := lab.NewTestLAN(t, "peer", "src", "dst")
	peer, src, dst := lan.Host("peer"), lan.Host("src"), lan.Host("dst")
	addrs := [4]string{"198.18.0.1/24", "198.18.0.2/24", "198.18.0.3/24", "198.18.0.10/24"}
	if v6 {
		addrs = [4]string{"fd00::1/64", "fd00::2/64", "fd00::3/64", "fd00::10/64"}
	}
	for i, ns := range []*lab.NS{peer, src, dst} {
		if err := ns.AddAddr(netip.MustParsePrefix(addrs[i])); err != nil {
			t.Fatal(err)
		}
	}
	svcP := netip.MustParsePrefix(addrs[3])
	if err := src.AddAddr(svcP); err != nil {
		t.Fatal(err)
	}
	svcAP := netip.AddrPortFrom(svcP.Addr(), svcPort)
	var ln net.Listener
	if err := src.Do(func() (err error) { ln, err = net.Listen("tcp", svcAP.String()); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	t0 := time.Now()
	defer func() { t.Logf("total %v", time.Since(t0)) }()
	states := []repair.State{repair.StateEstablished, repair.StateFinWait1, repair.StateFinWait2,
		repair.StateCloseWait, repair.StateLastAck, repair.StateClose}
	conns := make([]*mixConn, len(states))
	for i, st := range states {
		var pc net.Conn
		if err := peer.Do(func() (err error) { pc, err = net.Dial("tcp", svcAP.String()); return err }); err != nil {
			t.Fatal(err)
		}
		wc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c := &mixConn{state: st, peer: pc.(*net.TCPConn), work: wc.(*net.TCPConn)}
		defer c.peer.Close()
		defer c.work.Close()
		conns[i] = c
	}
	watch := startWatch(t, lan, peer, v6)

	// Drive each connection into its state; the workload never reads, so
	// every byte the peer writes is queued at it.
	var dropRules []string
	for _, c := range conns {
		c.peerWrite(t, 7000)
		switch c.state {
		case repair.StateFinWait1: // the workload's FIN reaches the peer; its ACK is lost
			c.dropAcks = true
			dropRules = append(dropRules, dropRule(c, v6))
		case repair.StateLastAck: // the peer's FIN gets through, then its ACKs are lost
			c.peer.CloseWrite()
			waitConnState(t, "LAST_ACK setup", c.work, repair.StateCloseWait)
			c.dropAcks = true
			dropRules = append(dropRules, dropRule(c, v6))
		}
	}
	peerDrop(t, peer, dropRules)
	for _, c := range conns {
		switch c.state {
		case repair.StateEstablished:
			c.workWrite(t, c.work, 5000)
		case repair.StateFinWait1:
			c.workWrite(t, c.work, 5000)
			c.work.CloseWrite()
		case repair.StateFinWait2:
			c.workWrite(t, c.work, 5000)
			c.work.CloseWrite()
			if err := readAll(c.peer, 0, c.toPeer); err != nil {
				t.Fatal("FIN_WAIT2 setup: ", err)
			}
		case repair.StateCloseWait:
			c.peer.CloseWrite()
		case repair.StateLastAck:
			c.workWrite(t, c.work, 5000)
			c.work.CloseWrite()
		case repair.StateClose:
			c.peer.CloseWrite()
			waitConnState(t, "CLOSE setup", c.work, repair.StateCloseWait)
			c.workWrite(t, c.work, 5000)
			c.work.CloseWrite()
			if err := readAll(c.peer, 0, c.toPeer); err != nil {
				t.Fatal("CLOSE setup: ", err)
			}
		}
		waitConnState(t, "workload side", c.work, c.state)
	}

	t.Logf("setup done at %v", time.Since(t0))
	// The agents.
	srcTC, dstTC := pki(t)
	delivered := make(chan *target.Delivered, len(conns))
	srv, err := target.NewServer(target.Config{
		Transport: dstTC, NetNS: dst.Handle(), Allow: []netip.Prefix{svcP}, JournalDir: t.TempDir(),
		Claim: func(context.Context, []netip.Prefix) error {
			if err := dst.AddAddr(svcP); err != nil {
				return err
			}
			return peer.FlushNeigh(svcP.Addr())
		},
		Unclaim: func(context.Context, []netip.Prefix) error { return dst.DelAddr(svcP) },
		Deliver: func(_ context.Context, ds []*target.Delivered) map[uint32]error {
			for _, d := range ds {
				delivered <- d
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	tl, err := transport.Listen("127.0.0.1:0", dstTC)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Serve(ctx, tl)
	var hand []source.Conn
	for _, c := range conns {
		f, err := c.work.File()
		if err != nil {
			t.Fatal(err)
		}
		hand = append(hand, source.Conn{File: f})
	}
	res, err := source.Migrate(ctxT(t), source.Config{
		To: tl.Addr().String(), Transport: srcTC, NetNS: src.Handle(), Lease: 5 * time.Second,
		Timeout: 10 * time.Second, JournalDir: t.TempDir(),
		Switch: func(context.Context) error { return src.DelAddr(svcP) },
		Unswitch: func(context.Context) error {
			if err := src.AddAddr(svcP); err != nil {
				return err
			}
			return peer.FlushNeigh(svcP.Addr())
		},
	}, hand)
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	for i, c := range res.Conns {
		if c.Outcome != source.Committed {
			t.Fatalf("connection %d (%s): %s: %v", i, conns[i].state, c.Outcome, c.Err)
		}
	}
	for _, c := range conns {
		c.work.Close() // in repair mode at the source: silent
	}
	t.Logf("migrated at %v", time.Since(t0))
	// The peer's path heals.
	peerDrop(t, peer, nil)

	// Hand every delivered socket to its connection.
	byPeer := map[netip.AddrPort]*net.TCPConn{}
	for range conns {
		select {
		case d := <-delivered:
			nc, err := d.Conn()
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			byPeer[netip.AddrPortFrom(d.Remote.Addr().Unmap(), d.Remote.Port())] = nc.(*net.TCPConn)
		case <-time.After(10 * time.Second):
			t.Fatal("not every connection was delivered")
		}
	}

	// The rest of each conversation, judged from the peer's side.
	var wg sync.WaitGroup
	errs := make(chan error, len(conns))
	for _, c := range conns {
		moved := byPeer[c.peer.LocalAddr().(*net.TCPAddr).AddrPort()]
		if moved == nil {
			t.Fatalf("%s: no delivered socket", c.state)
		}
		if st := stateOf(t, moved); st != c.state && !(c.dropAcks && st == next(c.state)) {
			t.Errorf("%s: delivered in %s", c.state, st)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func(start time.Time) { t.Logf("%s: finished in %v", c.state, time.Since(start)) }(time.Now())
			if err := finishMix(t, c, moved); err != nil {
				errs <- fmt.Errorf("%s: %w", c.state, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// Every connection is over on the peer's side, through an orderly close.
	for _, c := range conns {
		waitConnState(t, c.state.String()+": peer side", c.peer, repair.StateClose)
	}
	judgeNoReset(t, watch)
}

// next is the state a held connection reaches once the peer's
// acknowledgement gets through.
func next(s repair.State) repair.State {
	switch s {
	case repair.StateFinWait1:
		return repair.StateFinWait2
	case repair.StateLastAck:
		return repair.StateClose
	}
	return s
}

// finishMix completes one conversation after the move: whatever the peer
// has not read yet, then end-of-file where the workload closed; the peer
// closes where it had not; the moved socket reads everything the peer
// wrote and end-of-file.
func finishMix(t *testing.T, c *mixConn, moved *net.TCPConn) error {
	switch c.state {
	case repair.StateEstablished:
		c.workWrite(t, moved, 3000)
		moved.CloseWrite()
		c.peerWrite(t, 2000)
		c.peer.CloseWrite()
	case repair.StateFinWait1, repair.StateFinWait2:
		c.peerWrite(t, 2000)
		c.peer.CloseWrite()
	case repair.StateCloseWait:
		c.workWrite(t, moved, 3000)
		moved.CloseWrite()
	}
	if c.state != repair.StateFinWait2 && c.state != repair.StateClose {
		if err := readAll(c.peer, 0, c.toPeer); err != nil {
			return fmt.Errorf("peer: %w", err)
		}
	}
	if err := readAll(moved, 1, c.toWork); err != nil {
		return fmt.Errorf("moved socket: %w", err)
	}
	return nil
}

// dropRule drops the peer's segments of c towards the service (its ACKs).
func dropRule(c *mixConn, v6 bool) string {
	ipk := "ip"
	if v6 {
		ipk = "ip6"
	}
	l := c.peer.LocalAddr().(*net.TCPAddr).AddrPort()
	return fmt.Sprintf("%s saddr %s tcp sport %d tcp dport %d drop", ipk, l.Addr(), l.Port(), svcPort)
}

// peerDrop replaces the peer's drop rules with rules (none: remove them).
func peerDrop(t *testing.T, peer *lab.NS, rules []string) {
	t.Helper()
	peer.Exec("nft", "delete", "table", "inet", "lossy")
	if len(rules) == 0 {
		return
	}
	script := "table inet lossy {\n chain out { type filter hook output priority 0;\n  " + strings.Join(rules, "\n  ") + "\n }\n}\n"
	cmd := peer.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft on the peer: %v: %s", err, b)
	}
}

// judgeNoReset stops the capture and fails on any RST on the bridge or
// any reset the peer counted (FINs are expected here).
func judgeNoReset(t *testing.T, w *watch) {
	t.Helper()
	after, err := w.peer.Resets()
	if err != nil {
		t.Fatal(err)
	}
	if after != w.before {
		t.Errorf("the peer counted %d resets", after-w.before)
	}
	segs, err := w.capture.Stop()
	if err != nil {
		t.Fatal(err)
	}
	fins := 0
	for _, s := range segs {
		if strings.Contains(s, "Flags [R") {
			t.Errorf("RST on the bridge: %s", s)
		}
		if strings.Contains(s, "Flags [F") {
			fins++
		}
	}
	t.Logf("%d FIN segments on the bridge", fins)
}
