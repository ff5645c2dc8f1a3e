package repair

import (
	"bytes"
	"io"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPrecapture copies a live connection with data queued in its receive
// queue (Precapture), and checks that the socket left repair mode and goes
// on, that Unchanged then confirms the copy (it matches a Capture taken
// after it), and that Unchanged refuses it once a segment came in, or once
// the owner wrote. Every byte arrives once each way and the peer sees no
// reset.
func TestPrecapture(t *testing.T) {
	h := newHosts(t, false)
	peerAP := netip.AddrPortFrom(h.peerAddr, peerPort)
	local := netip.AddrPortFrom(h.svc, 40003)
	before := tcpCounters(t, h.peer)
	src, peer := dialPeer(t, h, unix.AF_INET, local, peerAP, nil, nil)
	defer src.Close()
	defer peer.Close()
	fd := fdOf(t, src)
	fromPeer := bytes.Repeat([]byte("p"), 2048)
	if _, err := peer.Write(fromPeer); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the peer's bytes in the receive queue", time.Second, func() bool {
		n, _ := unix.IoctlGetInt(fd, unix.SIOCINQ)
		return n == len(fromPeer)
	})
	repairOn := func() int {
		v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	leave := func(s *Snapshot) {
		t.Helper()
		if err := ResumeHeld(fd, s); err != nil {
			t.Fatal(err)
		}
	}

	s := inspected(t, h.src, fd)
	var mark Mark
	if err := h.src.Do(func() (err error) { mark, err = Precapture(fd, s); return err }); err != nil {
		t.Fatal(err)
	}
	if !mark.Taken() || repairOn() != 0 {
		t.Fatalf("after Precapture: mark taken %v, repair mode %d; want a mark and the socket out of repair mode", mark.Taken(), repairOn())
	}
	if !bytes.Equal(s.RecvQueue, fromPeer) {
		t.Fatalf("the copy's receive queue holds %d bytes, want the peer's %d", len(s.RecvQueue), len(fromPeer))
	}
	same, err := Unchanged(fd, s, &mark)
	if err != nil || !same {
		t.Fatalf("Unchanged on a connection that did not move: %v, %v; want true", same, err)
	}
	if repairOn() != 1 {
		t.Fatal("Unchanged did not leave the socket in repair mode")
	}
	again := *s
	again.RecvQueue, again.SendQueue = nil, nil
	if err := Capture(fd, &again); err != nil {
		t.Fatal(err)
	}
	if again.SendSeq != s.SendSeq || again.RecvSeq != s.RecvSeq || again.Window.SndWnd != s.Window.SndWnd ||
		!bytes.Equal(again.RecvQueue, s.RecvQueue) || !bytes.Equal(again.SendQueue, s.SendQueue) {
		t.Fatalf("a capture after the confirmation differs from the copy: %v", diffFields(*s, again))
	}
	leave(s)

	// A segment from the peer moves the connection.
	if err := h.src.Do(func() (err error) { mark, err = Precapture(fd, s); return err }); err != nil {
		t.Fatal(err)
	}
	if _, err := peer.Write([]byte("q")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the peer's last byte", time.Second, func() bool {
		n, _ := unix.IoctlGetInt(fd, unix.SIOCINQ)
		return n == len(fromPeer)+1
	})
	if same, err := Unchanged(fd, s, &mark); err != nil || same {
		t.Fatalf("Unchanged after a segment came in: %v, %v; want false", same, err)
	}
	leave(s)

	// So does a write of the owner's.
	if err := h.src.Do(func() (err error) { mark, err = Precapture(fd, s); return err }); err != nil {
		t.Fatal(err)
	}
	toPeer := []byte("written after the copy")
	if _, err := src.Write(toPeer); err != nil {
		t.Fatal(err)
	}
	if same, err := Unchanged(fd, s, &mark); err != nil || same {
		t.Fatalf("Unchanged after the owner wrote: %v, %v; want false", same, err)
	}
	leave(s)

	// The zero mark is never unchanged, and Unchanged still turns repair on.
	if same, err := Unchanged(fd, s, &Mark{}); err != nil || same || repairOn() != 1 {
		t.Fatalf("Unchanged with the zero mark: %v, %v, repair %d; want false, nil, 1", same, err, repairOn())
	}
	leave(s)

	got := make([]byte, len(fromPeer)+1)
	src.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := io.ReadFull(src, got); err != nil || !bytes.Equal(got, append(fromPeer, 'q')) {
		t.Fatalf("source read %q..., %v; want the peer's bytes once", got[:8], err)
	}
	back := make([]byte, len(toPeer))
	peer.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := io.ReadFull(peer, back); err != nil || !bytes.Equal(back, toPeer) {
		t.Fatalf("peer read %q, %v; want %q", back, err, toPeer)
	}
	wantPeerNoReset(t, h, before)
}
