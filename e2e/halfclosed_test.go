package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
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

// stateOf reads the TCP state of the socket c (a *net.TCPConn or an
// *os.File).
func stateOf(t *testing.T, c syscall.Conn) repair.State {
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

func waitConnState(t *testing.T, what string, c syscall.Conn, want repair.State) {
	t.Helper()
	lab.WaitFor(t, fmt.Sprintf("%s in %s", what, want), func() (bool, string) {
		st := stateOf(t, c)
		return st == want, st.String()
	})
}

// TestHalfClosedMix migrates, through both agents (Go API), a mix of
// connections in ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK and
// CLOSE, each with unread bytes queued at the workload, and one in SYN_SENT
// (the workload dialling a listener on the peer, whose path drops the SYN
// until after the commit), over IPv4 and IPv6.
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
	svcP, peerIP := svc, peerAddr.Addr()
	if v6 {
		svcP, peerIP = svc6, peer6.Addr()
	}
	lan, peer, src, dst := lanHostsWith(t, svcP)
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
	// One more connection, from the workload to a listener on the peer,
	// whose SYN the peer does not answer yet (its path drops it).
	peerLnAP := netip.AddrPortFrom(peerIP, 9000)
	var peerLn net.Listener
	if err := peer.Do(func() (err error) { peerLn, err = net.Listen("tcp", peerLnAP.String()); return err }); err != nil {
		t.Fatal(err)
	}
	defer peerLn.Close()
	ipk := "ip"
	if v6 {
		ipk = "ip6"
	}
	synDrop := fmt.Sprintf("%s daddr %s tcp dport %d drop", ipk, peerLnAP.Addr(), peerLnAP.Port())
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
	peerDrop(t, peer, dropRules, []string{synDrop})
	synFile := dialSynSent(t, src, svcP.Addr(), peerLnAP)
	defer synFile.Close()
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
	delivered := make(chan *target.Delivered, len(conns)+1)
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
	hand = append(hand, source.Conn{File: synFile})
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
			t.Fatalf("connection %d (%s): %s: %v", i, c.Local, c.Outcome, c.Err)
		}
	}
	for _, c := range conns {
		c.work.Close() // in repair mode at the source: silent
	}
	t.Logf("migrated at %v: state %s, phases %v", time.Since(t0), res.State, res.Phases)
	// The peer's path heals.
	peerDrop(t, peer, nil, nil)

	// Hand every delivered socket to its connection.
	byPeer := map[netip.AddrPort]*net.TCPConn{}
	for range len(conns) + 1 {
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
	errs := make(chan error, len(conns)+1)
	synMoved := byPeer[peerLnAP]
	if synMoved == nil {
		t.Fatal("SYN_SENT: no delivered socket")
	}
	if st := stateOf(t, synMoved); st != repair.StateSynSent {
		t.Errorf("SYN_SENT: delivered in %s", st)
	}
	var synPeer *net.TCPConn
	wg.Add(1)
	go func() {
		defer wg.Done()
		start := time.Now()
		peerLn.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
		pc, err := peerLn.Accept()
		if err != nil {
			errs <- fmt.Errorf("SYN_SENT: the peer's listener: %w", err)
			return
		}
		t.Logf("SYN_SENT: accepted %v after the commit", time.Since(start))
		synPeer = pc.(*net.TCPConn)
		c := &mixConn{state: repair.StateSynSent, peer: synPeer}
		c.workWrite(t, synMoved, 3000)
		synMoved.CloseWrite()
		c.peerWrite(t, 2000)
		synPeer.CloseWrite()
		if err := readAll(synPeer, 0, c.toPeer); err != nil {
			errs <- fmt.Errorf("SYN_SENT: peer: %w", err)
		}
		if err := readAll(synMoved, 1, c.toWork); err != nil {
			errs <- fmt.Errorf("SYN_SENT: moved socket: %w", err)
		}
	}()
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
	if synPeer != nil {
		defer synPeer.Close()
		waitConnState(t, "SYN_SENT: peer side", synPeer, repair.StateClose)
	}
	t.Logf("%d FIN segments on the bridge", watch.noReset(t))
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

// dialSynSent connects from the service address on the source host to
// remote without waiting: the peer drops the SYN, so the socket stays in
// SYN_SENT.
func dialSynSent(t *testing.T, src *lab.NS, local netip.Addr, remote netip.AddrPort) *os.File {
	t.Helper()
	family := unix.AF_INET
	if local.Is6() {
		family = unix.AF_INET6
	}
	var fd int
	if err := src.Do(func() (err error) {
		if fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		var la, ra unix.Sockaddr
		if family == unix.AF_INET {
			la = &unix.SockaddrInet4{Addr: local.As4()}
			ra = &unix.SockaddrInet4{Addr: remote.Addr().As4(), Port: int(remote.Port())}
		} else {
			la = &unix.SockaddrInet6{Addr: local.As16()}
			ra = &unix.SockaddrInet6{Addr: remote.Addr().As16(), Port: int(remote.Port())}
		}
		if err := unix.Bind(fd, la); err != nil {
			return err
		}
		if err := unix.Connect(fd, ra); err != unix.EINPROGRESS {
			return fmt.Errorf("connect: %v, want EINPROGRESS", err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "syn-sent")
	waitConnState(t, "the dialing socket", f, repair.StateSynSent)
	return f
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

// peerDrop replaces the peer's drop rules with out (its output) and in
// (its input); none removes them.
func peerDrop(t *testing.T, peer *lab.NS, out, in []string) {
	t.Helper()
	peer.Exec("nft", "delete", "table", "inet", "lossy")
	if len(out)+len(in) == 0 {
		return
	}
	script := "table inet lossy {\n chain out { type filter hook output priority 0;\n  " + strings.Join(out, "\n  ") + "\n }\n" +
		" chain in { type filter hook input priority 0;\n  " + strings.Join(in, "\n  ") + "\n }\n}\n"
	cmd := peer.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft on the peer: %v: %s", err, b)
	}
}
