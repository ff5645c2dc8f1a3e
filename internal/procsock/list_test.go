package procsock_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/procsock"
	"github.com/tcpmigrate/tcpmigrate/repair"
)

var (
	appV4  = netip.MustParseAddr("198.18.0.1")
	peerV4 = netip.MustParseAddr("198.18.0.2")
	appV6  = netip.MustParseAddr("fd00::1")
	peerV6 = netip.MustParseAddr("fd00::2")
)

// world is an application host and a peer host on one LAN, with a server on
// the peer that accepts every connection and keeps it, keyed by the
// client's address.
type world struct {
	app, peer *lab.NS
	srv4      netip.AddrPort
	srv6      netip.AddrPort

	mu       sync.Mutex
	accepted map[netip.AddrPort]net.Conn
}

func newWorld(t *testing.T) *world {
	t.Helper()
	lan := lab.NewTestLAN(t, "app", "peer")
	w := &world{app: lan.Host("app"), peer: lan.Host("peer"), accepted: map[netip.AddrPort]net.Conn{}}
	for _, a := range []struct {
		ns *lab.NS
		p  netip.Prefix
	}{
		{w.app, netip.PrefixFrom(appV4, 24)}, {w.app, netip.PrefixFrom(appV6, 64)},
		{w.peer, netip.PrefixFrom(peerV4, 24)}, {w.peer, netip.PrefixFrom(peerV6, 64)},
	} {
		if err := a.ns.AddAddr(a.p); err != nil {
			t.Fatal(err)
		}
	}
	for _, addr := range []netip.Addr{peerV4, peerV6} {
		var ln net.Listener
		err := w.peer.Do(func() (err error) {
			ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		if addr.Is4() {
			w.srv4 = netip.MustParseAddrPort(ln.Addr().String())
		} else {
			w.srv6 = netip.MustParseAddrPort(ln.Addr().String())
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				w.mu.Lock()
				w.accepted[netip.MustParseAddrPort(c.RemoteAddr().String())] = c
				w.mu.Unlock()
			}
		}()
	}
	t.Cleanup(func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, c := range w.accepted {
			c.Close()
		}
	})
	return w
}

// peerConn returns the peer's side of the connection from client.
func (w *world) peerConn(t *testing.T, client netip.AddrPort) net.Conn {
	t.Helper()
	var c net.Conn
	lab.WaitFor(t, "peer to accept "+client.String(), func() (bool, string) {
		w.mu.Lock()
		defer w.mu.Unlock()
		c = w.accepted[client]
		return c != nil, fmt.Sprint(len(w.accepted), " accepted")
	})
	return c
}

// dialFromPeer connects from the peer host to addr.
func (w *world) dialFromPeer(t *testing.T, addr netip.AddrPort) net.Conn {
	t.Helper()
	var c net.Conn
	err := w.peer.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", addr.String(), 5*time.Second)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func find(socks []procsock.Socket, local, remote netip.AddrPort) *procsock.Socket {
	for i := range socks {
		if socks[i].Local == local && socks[i].Remote == remote {
			return &socks[i]
		}
	}
	return nil
}

func dumpList(socks []procsock.Socket) string {
	var b strings.Builder
	for _, s := range socks {
		fmt.Fprintf(&b, "\n  fds=%v %s %s->%s %s", s.FDs, s.State, s.Local, s.Remote, s.Verdict)
	}
	return b.String()
}

func TestList(t *testing.T) {
	w := newWorld(t)

	// A socket of the test process itself in the same namespace: it must
	// not be reported as the helper's.
	var decoy net.Conn
	if err := w.app.Do(func() (err error) {
		decoy, err = net.Dial("tcp", w.srv4.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer decoy.Close()

	h := startHelper(t, w.app,
		"listen="+netip.AddrPortFrom(appV4, 0).String(),
		"dial="+w.srv4.String(),
		"dup",
		"shut="+w.srv4.String(),
		"dial="+w.srv4.String(), // the peer closes this one: CLOSE_WAIT
		"dial="+w.srv6.String(),
		"shut="+w.srv6.String(),                         // the peer writes and closes this one: CLOSE, bytes unread
		"listen="+netip.AddrPortFrom(appV4, 0).String(), // its accepted connection is closed while the peer keeps its end: an orphan
	)
	lis, est, dup, shut, cw, est6, closed, lis2 := h.lines[0], h.lines[1], h.lines[2], h.lines[3], h.lines[4], h.lines[5], h.lines[6], h.lines[7]
	ap := netip.MustParseAddrPort
	closing := w.peerConn(t, ap(closed.local))
	if _, err := closing.Write([]byte("unread")); err != nil {
		t.Fatal(err)
	}
	closing.Close()
	listenAddr := ap(lis.local)

	// Peer side: close the CLOSE_WAIT one; make a TIME_WAIT on the
	// helper's listening port (the helper accepts and closes first); leave
	// one connection in its accept queue.
	w.peerConn(t, ap(cw.local)).Close()
	first := w.dialFromPeer(t, listenAddr)
	if n, err := first.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("read from the helper's accepted-and-closed connection: %d, %v; want EOF", n, err)
	}
	first.Close()
	queued := w.dialFromPeer(t, listenAddr)
	queuedLocal := ap(queued.RemoteAddr().String())
	queuedRemote := ap(queued.LocalAddr().String())
	// The helper closes this one at once and the peer never does: the
	// helper's end is an orphan in FIN_WAIT2, with no descriptor.
	listen2Addr := ap(lis2.local)
	kept := w.dialFromPeer(t, listen2Addr)
	if n, err := kept.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("read from the helper's second accepted-and-closed connection: %d, %v; want EOF", n, err)
	}
	orphanLocal, orphanRemote := ap(kept.RemoteAddr().String()), ap(kept.LocalAddr().String())

	type want struct {
		local, remote netip.AddrPort
		fds           []int
		family        uint16
		state         repair.State
		take          bool
		reason        procsock.Reason
		text          string
	}
	wants := []want{
		{listenAddr, netip.AddrPortFrom(netip.IPv4Unspecified(), 0), []int{lis.fd}, unix.AF_INET, repair.StateListen, false, procsock.ReasonListener, "listener (recreated on the target)"},
		{ap(est.local), ap(est.remote), []int{min(est.fd, dup.fd), max(est.fd, dup.fd)}, unix.AF_INET, repair.StateEstablished, true, 0, "take"},
		{ap(shut.local), ap(shut.remote), []int{shut.fd}, unix.AF_INET, repair.StateFinWait2, true, 0, "take"},
		{ap(cw.local), ap(cw.remote), []int{cw.fd}, unix.AF_INET, repair.StateCloseWait, true, 0, "take"},
		{ap(est6.local), ap(est6.remote), []int{est6.fd}, unix.AF_INET6, repair.StateEstablished, true, 0, "take"},
		{ap(closed.local), ap(closed.remote), []int{closed.fd}, unix.AF_INET6, repair.StateClose, true, 0, "take"},
		{queuedLocal, queuedRemote, nil, unix.AF_INET, repair.StateEstablished, false, procsock.ReasonNoDescriptor, "no descriptor (not yet accepted): taken from its listener by send --pid"},
		{orphanLocal, orphanRemote, nil, unix.AF_INET, repair.StateFinWait2, false, procsock.ReasonNoDescriptor, "stays behind: no descriptor (orphaned in FIN_WAIT2)"},
	}

	var socks []procsock.Socket
	lab.WaitFor(t, "the helper's sockets in their states", func() (bool, string) {
		var err error
		if socks, err = procsock.List(h.pid); err != nil {
			t.Fatal(err)
		}
		for _, wt := range wants {
			if s := find(socks, wt.local, wt.remote); s == nil || s.State != wt.state {
				return false, dumpList(socks)
			}
		}
		for _, s := range socks {
			if s.State == repair.StateTimeWait && s.Local == listenAddr {
				return true, ""
			}
		}
		return false, "no TIME_WAIT on the listening port:" + dumpList(socks)
	})
	t.Logf("List(%d):%s", h.pid, dumpList(socks))

	for _, wt := range wants {
		s := find(socks, wt.local, wt.remote)
		if s.PID != h.pid || !slices.Equal(s.FDs, wt.fds) || s.Family != wt.family ||
			s.Verdict.Take != wt.take || s.Verdict.Reason != wt.reason || s.Verdict.Text != wt.text {
			t.Errorf("%s->%s: got pid %d fds %v family %d verdict %+v; want pid %d fds %v family %d take %v reason %v %q",
				wt.local, wt.remote, s.PID, s.FDs, s.Family, s.Verdict, h.pid, wt.fds, wt.family, wt.take, wt.reason, wt.text)
		}
		if (len(wt.fds) > 0) != (s.Inode != 0) {
			t.Errorf("%s->%s: inode %d with fds %v", wt.local, wt.remote, s.Inode, s.FDs)
		}
	}
	// The closed connection is out of sock_diag's dump: List found it
	// through its descriptor, with its unread bytes.
	if s := find(socks, ap(closed.local), ap(closed.remote)); s.RecvQ != uint32(len("unread")) {
		t.Errorf("CLOSE %s->%s: RecvQ %d, want %d", s.Local, s.Remote, s.RecvQ, len("unread"))
	}
	var held, tw int
	cookies := map[uint64]bool{}
	decoyLocal := ap(decoy.LocalAddr().String())
	for i, s := range socks {
		if cookies[s.Cookie] || s.Cookie == 0 {
			t.Errorf("cookie %d repeated or zero", s.Cookie)
		}
		cookies[s.Cookie] = true
		if s.Local == decoyLocal {
			t.Errorf("the test's own socket %s is listed as the helper's", decoyLocal)
		}
		if len(s.FDs) > 0 {
			held++
			if i > 0 && len(socks[i-1].FDs) > 0 && socks[i-1].FDs[0] > s.FDs[0] {
				t.Errorf("sockets not in descriptor order:%s", dumpList(socks))
			}
		} else if s.Local.Port() != listenAddr.Port() && s.Local.Port() != listen2Addr.Port() {
			t.Errorf("socket without descriptor on a port the helper has none on: %s->%s", s.Local, s.Remote)
		}
		if s.State == repair.StateTimeWait {
			tw++
			if len(s.FDs) != 0 || s.Verdict.Take || s.Verdict.Reason != procsock.ReasonNoDescriptor ||
				!strings.HasPrefix(s.Verdict.Text, "stays behind: no descriptor") {
				t.Errorf("TIME_WAIT %s->%s: fds %v verdict %+v", s.Local, s.Remote, s.FDs, s.Verdict)
			}
		}
	}
	if held != 7 || tw != 1 {
		t.Errorf("%d sockets with descriptors and %d TIME_WAIT, want 7 and 1:%s", held, tw, dumpList(socks))
	}

	t.Run("Filter", func(t *testing.T) {
		estPort, est6Port := ap(est.local).Port(), ap(est6.local).Port()
		same, unused := procsock.Filter(socks, nil)
		if !slices.EqualFunc(same, socks, func(a, b procsock.Socket) bool { return a.Verdict == b.Verdict }) || unused != nil {
			t.Errorf("Filter(nil) changed verdicts or reported unused ports %v", unused)
		}
		only, unused := procsock.Filter(socks, []uint16{estPort, 1, listenAddr.Port()})
		taken := procsock.Taken(only)
		if len(taken) != 1 || taken[0].Local.Port() != estPort {
			t.Errorf("--port %d takes%s", estPort, dumpList(taken))
		}
		if !slices.Equal(unused, []uint16{1, listenAddr.Port()}) {
			t.Errorf("unused ports %v, want [1 %d] (nothing taken on them)", unused, listenAddr.Port())
		}
		if s := find(only, ap(est6.local), ap(est6.remote)); s.Verdict.Reason != procsock.ReasonFiltered || s.Verdict.Text != "port filtered out" {
			t.Errorf("IPv6 connection not selected: verdict %+v", s.Verdict)
		}
		if s := find(only, listenAddr, netip.AddrPortFrom(netip.IPv4Unspecified(), 0)); s.Verdict.Reason != procsock.ReasonListener {
			t.Errorf("listener verdict %+v after filter, want it kept", s.Verdict)
		}
		if s := find(socks, ap(est6.local), ap(est6.remote)); !s.Verdict.Take {
			t.Errorf("Filter changed its input")
		}
		v6, unused := procsock.Filter(socks, []uint16{est6Port})
		if taken := procsock.Taken(v6); len(taken) != 1 || taken[0].Family != unix.AF_INET6 || len(unused) != 0 {
			t.Errorf("--port %d (IPv6) takes%s; unused %v", est6Port, dumpList(taken), unused)
		}
	})

	t.Run("Inspect", func(t *testing.T) {
		// Urgent data pending on the IPv4 connection: repair refuses it.
		pc := w.peerConn(t, ap(est.local))
		rc, err := pc.(*net.TCPConn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var serr error
		if err := rc.Write(func(fd uintptr) bool {
			serr = unix.Send(int(fd), []byte{'!'}, unix.MSG_OOB)
			return true
		}); err != nil || serr != nil {
			t.Fatal(err, serr)
		}
		var got []procsock.Socket
		lab.WaitFor(t, "urgent data to be refused", func() (bool, string) {
			if got, err = procsock.Inspect(h.pid, socks); err != nil {
				t.Fatal(err)
			}
			s := find(got, ap(est.local), ap(est.remote))
			return s.Verdict.Reason == procsock.ReasonRepair, s.Verdict.Text
		})
		if s := find(got, ap(est.local), ap(est.remote)); s.Verdict.Take || s.Verdict.Text != "repair: urgent-data" {
			t.Errorf("verdict %+v, want repair: urgent-data", s.Verdict)
		}
		if s := find(got, ap(est6.local), ap(est6.remote)); !s.Verdict.Take {
			t.Errorf("IPv6 connection refused: %+v", s.Verdict)
		}
		if s := find(socks, ap(est.local), ap(est.remote)); !s.Verdict.Take {
			t.Errorf("Inspect changed its input")
		}
	})
}

func TestListErrors(t *testing.T) {
	lab.Require(t)
	_, err := procsock.List(1 << 30)
	var pe *procsock.Error
	if !errors.As(err, &pe) || pe.PID != 1<<30 || !errors.Is(err, unix.ENOENT) {
		t.Errorf("List of a missing process: %v", err)
	}
	if !strings.HasPrefix(fmt.Sprint(err), "procsock: ") {
		t.Errorf("error %q lacks the package prefix", err)
	}
}
