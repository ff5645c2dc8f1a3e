package repair

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// TestTCPInfoLayout pins tcpInfoHead to struct tcp_info as
// golang.org/x/sys/unix lays it out (its TCPInfo leaves the two bytes of
// the window scales and flags unnamed, at offsets 6 and 7).
func TestTCPInfoLayout(t *testing.T) {
	var h tcpInfoHead
	var u unix.TCPInfo
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"Options", unsafe.Offsetof(h.Options), unsafe.Offsetof(u.Options)},
		{"WScale", unsafe.Offsetof(h.WScale), 6},
		{"RTO", unsafe.Offsetof(h.RTO), unsafe.Offsetof(u.Rto)},
		{"Unacked", unsafe.Offsetof(h.Unacked), unsafe.Offsetof(u.Unacked)},
		{"TotalRetrans", unsafe.Offsetof(h.TotalRetrans), unsafe.Offsetof(u.Total_retrans)},
		{"PacingRate", unsafe.Offsetof(h.PacingRate), unsafe.Offsetof(u.Pacing_rate)},
		{"BytesAcked", unsafe.Offsetof(h.BytesAcked), unsafe.Offsetof(u.Bytes_acked)},
		{"BytesReceived", unsafe.Offsetof(h.BytesReceived), unsafe.Offsetof(u.Bytes_received)},
		{"SegsOut", unsafe.Offsetof(h.SegsOut), unsafe.Offsetof(u.Segs_out)},
		{"SegsIn", unsafe.Offsetof(h.SegsIn), unsafe.Offsetof(u.Segs_in)},
		{"NotsentBytes", unsafe.Offsetof(h.NotsentBytes), unsafe.Offsetof(u.Notsent_bytes)},
		{"MinRTT", unsafe.Offsetof(h.MinRTT), unsafe.Offsetof(u.Min_rtt)},
		{"size", unsafe.Sizeof(h), unsafe.Offsetof(u.Data_segs_in)},
	} {
		if c.got != c.want {
			t.Errorf("%s at offset %d, struct tcp_info has it at %d", c.name, c.got, c.want)
		}
	}
}

// leak is something a test lets reach a socket in the middle of a
// capture, as if it had got past the lock: cl is the captured socket, sv
// its peer, s the snapshot being filled. It returns once the socket has
// taken the segment.
type leak func(t *testing.T, in *Injector, cl, sv int, s *Snapshot)

// leakData has the peer send one byte.
func leakData(t *testing.T, _ *Injector, cl, sv int, _ *Snapshot) {
	t.Helper()
	arrival(t, cl, func() error {
		_, err := unix.Write(sv, []byte{'x'})
		return err
	})
}

// leakFIN has the peer shut its sending side down.
func leakFIN(t *testing.T, _ *Injector, cl, sv int, _ *Snapshot) {
	t.Helper()
	arrival(t, cl, func() error { return unix.Shutdown(sv, unix.SHUT_WR) })
}

// leakWindow sends, as from the peer, a pure ACK that only opens the
// peer's window: it moves none of the counters that the re-read of the
// queue lengths and sequence numbers used to compare, only snd_wnd.
func leakWindow(t *testing.T, in *Injector, cl, sv int, s *Snapshot) {
	t.Helper()
	var before, after Window
	if err := getWindow(cl, &before); err != nil {
		t.Fatal(err)
	}
	from, to := peerAndLocal(t, cl)
	arrival(t, cl, func() error {
		return in.Send(Segment{From: from, To: to, Seq: s.RecvSeq, Ack: s.SendSeq, Flags: SegACK, Window: 0xffff})
	})
	if err := getWindow(cl, &after); err != nil {
		t.Fatal(err)
	}
	if after.SndWnd == before.SndWnd {
		t.Fatalf("the crafted ACK did not move the peer's window (%d)", after.SndWnd)
	}
}

func peerAndLocal(t *testing.T, fd int) (peer, local netip.AddrPort) {
	t.Helper()
	local, err := sockname(fd, false)
	if err != nil {
		t.Fatal(err)
	}
	if peer, err = sockname(fd, true); err != nil {
		t.Fatal(err)
	}
	return peer, local
}

// arrival runs send and waits until the socket fd has counted a segment
// more (tcpi_segs_in).
func arrival(t *testing.T, fd int, send func() error) {
	t.Helper()
	var ti tcpInfoHead
	if err := getInfo(fd, &ti); err != nil {
		t.Fatal(err)
	}
	before := ti.SegsIn
	if err := send(); err != nil {
		t.Fatal(err)
	}
	lab.WaitFor(t, "the leaked segment at the socket", func() (bool, string) {
		if err := getInfo(fd, &ti); err != nil {
			return false, err.Error()
		}
		return ti.SegsIn != before, fmt.Sprintf("segs_in %d", ti.SegsIn)
	})
}

// withRecheckHook runs fn with testHook set to run hook at step
// "recheck".
func withRecheckHook(hook func(fd int, s *Snapshot), fn func()) {
	withHook("recheck", hook, fn)
}

// withHook runs fn with testHook set to run hook at step.
func withHook(step string, hook func(fd int, s *Snapshot), fn func()) {
	testHook = func(at string, fd int, s *Snapshot) {
		if at == step {
			hook(fd, s)
		}
	}
	defer func() { testHook = nil }()
	fn()
}

// TestCaptureUnstable lets a segment reach the socket between Capture's
// first reads and its re-read (D14), as one that got past a lock that
// does not hold: data, the peer's FIN, and a pure window update (which
// the re-read of sequence numbers and queue lengths that the TCP_INFO
// comparison replaced did not see). Once, the capture starts again and
// takes the new state; every time, it fails with ErrUnstable and leaves
// the socket out of repair mode and working.
func TestCaptureUnstable(t *testing.T) {
	ns := solo(t)
	in := newInjector(t, ns, 0)
	for _, c := range []struct {
		name  string
		leak  leak
		check func(t *testing.T, s *Snapshot, cl int)
	}{
		{"data", leakData, func(t *testing.T, s *Snapshot, _ int) {
			if string(s.RecvQueue) != "x" {
				t.Errorf("receive queue %q, want the leaked byte", s.RecvQueue)
			}
		}},
		{"fin", leakFIN, func(t *testing.T, s *Snapshot, _ int) {
			if s.State != StateCloseWait || s.Shutdown&ShutRead == 0 {
				t.Errorf("state %s, shutdown %d: want CLOSE_WAIT with the read side shut", s.State, s.Shutdown)
			}
		}},
		{"window", leakWindow, func(t *testing.T, s *Snapshot, cl int) {
			var w Window
			if err := getWindow(cl, &w); err != nil {
				t.Fatal(err)
			}
			if s.Window != w {
				t.Errorf("window %+v, the socket has %+v", s.Window, w)
			}
		}},
	} {
		t.Run(c.name+"/once", func(t *testing.T) {
			cl, sv := pair(t, ns, 0, nil, nil)
			s := inspected(t, ns, cl)
			calls := 0
			var err error
			withRecheckHook(func(fd int, s *Snapshot) {
				if calls++; calls == 1 {
					c.leak(t, in, cl, sv, s)
				}
			}, func() { err = Capture(cl, s) })
			if err != nil {
				t.Fatalf("Capture after one leak: %v", err)
			}
			if calls != 2 {
				t.Errorf("%d attempts, want 2", calls)
			}
			c.check(t, s, cl)
			if err := Resume(cl, s); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("data/always", func(t *testing.T) {
		cl, sv := pair(t, ns, 0, nil, nil)
		s := inspected(t, ns, cl)
		calls := 0
		var err error
		withRecheckHook(func(fd int, s *Snapshot) {
			calls++
			leakData(t, in, cl, sv, s)
		}, func() { err = Capture(cl, s) })
		var oe *OpError
		if !errors.Is(err, ErrUnstable) || !errors.As(err, &oe) {
			t.Fatalf("Capture with a leak on every attempt: %v, want ErrUnstable", err)
		}
		t.Logf("%v", err)
		if calls != maxCaptureAttempts {
			t.Errorf("%d attempts, want %d", calls, maxCaptureAttempts)
		}
		if v, _ := unix.GetsockoptInt(cl, unix.IPPROTO_TCP, unix.TCP_REPAIR); v != 0 {
			t.Fatal("socket left in repair mode after ErrUnstable")
		}
		buf := make([]byte, 8)
		if n, err := unix.Read(cl, buf); err != nil || string(buf[:n]) != "xxx" {
			t.Fatalf("read after ErrUnstable: %q, %v; want the three leaked bytes", buf[:n], err)
		}
	})
}

// TestCaptureLengths compares the queue lengths Capture takes from TCP_INFO
// (captureLengths) with the three ioctls, in the conditions where they
// could part: nothing queued, data in flight, data never sent behind a
// closed window, our FIN never sent, in flight and acknowledged, the peer's FIN, and
// CLOSE after a reset with data in flight (where only SIOCOUTQ differs,
// and Capture keeps no send data).
func TestCaptureLengths(t *testing.T) {
	ns := solo(t)
	small := func(fd int) error { return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4096) }
	// deaf drops the peer's segments to cl (its ACKs, its FIN).
	deaf := func(t *testing.T, cl int) {
		peer, local := peerAndLocal(t, cl)
		nftLock(t, ns, local, peer, true, false)
	}
	for _, c := range []struct {
		name  string
		setup func(t *testing.T, cl, sv int) State
	}{
		{"idle", func(t *testing.T, cl, sv int) State { return StateEstablished }},
		{"in flight", func(t *testing.T, cl, sv int) State {
			deaf(t, cl)
			unix.Write(cl, make([]byte, 1000))
			return StateEstablished
		}},
		{"never sent", func(t *testing.T, cl, sv int) State {
			fill(cl)
			waitInfo(t, cl, "nothing in flight, data never sent", func(ti *tcpInfoHead) bool {
				return ti.Unacked == 0 && ti.NotsentBytes > 0
			})
			return StateEstablished
		}},
		{"fin never sent", func(t *testing.T, cl, sv int) State {
			fill(cl)
			unix.Shutdown(cl, unix.SHUT_WR)
			waitInfo(t, cl, "nothing in flight, data and FIN never sent", func(ti *tcpInfoHead) bool {
				return ti.Unacked == 0 && ti.NotsentBytes > 0
			})
			return StateFinWait1
		}},
		{"fin in flight", func(t *testing.T, cl, sv int) State {
			deaf(t, cl)
			unix.Write(cl, make([]byte, 100))
			unix.Shutdown(cl, unix.SHUT_WR)
			return StateFinWait1
		}},
		{"fin acknowledged", func(t *testing.T, cl, sv int) State {
			unix.Shutdown(cl, unix.SHUT_WR)
			return StateFinWait2
		}},
		{"peer fin", func(t *testing.T, cl, sv int) State {
			unix.Write(sv, []byte("unread"))
			unix.Shutdown(sv, unix.SHUT_WR)
			return StateCloseWait
		}},
		{"reset", func(t *testing.T, cl, sv int) State {
			deaf(t, cl)
			unix.Write(cl, make([]byte, 1000))
			unix.Write(sv, []byte("unread"))
			nftUnlock(t, ns)
			unix.SetsockoptLinger(sv, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
			unix.Close(sv)
			return StateClose
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cl, sv := pair(t, ns, 0, small, nil)
			want := c.setup(t, cl, sv)
			defer func() { ns.Exec("nft", "delete", "table", "inet", "repairtest") }()
			var ti tcpInfoHead
			waitInfo(t, cl, "state "+want.String(), func(ti *tcpInfoHead) bool { return State(ti.State) == want })
			if err := getInfo(cl, &ti); err != nil {
				t.Fatal(err)
			}
			outq, unsq, inq, op, err := captureLengths(cl, State(ti.State), &ti)
			if err != nil {
				t.Fatalf("%s: %v", op, err)
			}
			ioOut, ioUnsq, ioInq, op, err := queueLengths(cl)
			if err != nil {
				t.Fatalf("%s: %v", op, err)
			}
			t.Logf("%s: TCP_INFO unacked %d notsent %d; SIOCOUTQ %d SIOCOUTQNSD %d SIOCINQ %d", State(ti.State), ti.Unacked, ti.NotsentBytes, ioOut, ioUnsq, ioInq)
			if unsq != ioUnsq || inq != ioInq || (outq != ioOut && want != StateClose) {
				t.Errorf("from TCP_INFO: outq %d unsq %d inq %d; ioctls: %d %d %d", outq, unsq, inq, ioOut, ioUnsq, ioInq)
			}
		})
	}
}

// queueLengths reads SIOCOUTQ, SIOCOUTQNSD and SIOCINQ, the lengths
// captureLengths reads from TCP_INFO where it can; on error it names the
// failed operation.
func queueLengths(fd int) (outq, unsq, inq int32, op string, err error) {
	if outq, err = ioctlIntRaw(fd, unix.SIOCOUTQ); err != nil {
		return 0, 0, 0, "ioctl SIOCOUTQ", err
	}
	if unsq, err = ioctlIntRaw(fd, unix.SIOCOUTQNSD); err != nil {
		return 0, 0, 0, "ioctl SIOCOUTQNSD", err
	}
	if inq, err = ioctlIntRaw(fd, unix.SIOCINQ); err != nil {
		return 0, 0, 0, "ioctl SIOCINQ", err
	}
	if outq < 0 || unsq < 0 || inq < 0 || unsq > outq {
		return 0, 0, 0, "queue lengths", ErrQueueMismatch
	}
	return outq, unsq, inq, "", nil
}

// fill writes to fd until its send buffer is full.
func fill(fd int) {
	unix.SetNonblock(fd, true)
	buf := make([]byte, 64<<10)
	for {
		if _, err := unix.Write(fd, buf); err != nil {
			return
		}
	}
}

// waitInfo waits until the TCP_INFO of fd satisfies cond.
func waitInfo(t *testing.T, fd int, what string, cond func(*tcpInfoHead) bool) {
	t.Helper()
	lab.WaitFor(t, what, func() (bool, string) {
		var ti tcpInfoHead
		if err := getInfo(fd, &ti); err != nil {
			return false, err.Error()
		}
		return cond(&ti), fmt.Sprintf("state %s, unacked %d, notsent %d", State(ti.State), ti.Unacked, ti.NotsentBytes)
	})
}

// TestCaptureSendQueueMoves acknowledges data in flight, as the peer
// would, through a lock that does not hold. Before Capture, acknowledging
// part of a segment leaves the kernel's skb untrimmed, so the send-queue
// peek returns more bytes than SIOCOUTQ (CRIU #622): ErrQueueMismatch, as
// nothing moved during the capture. Between SIOCOUTQ and the peek,
// acknowledging all of it empties the queue under the peek: the socket
// moved, so the capture starts again and finds the queue empty.
func TestCaptureSendQueueMoves(t *testing.T) {
	ns := solo(t)
	in := newInjector(t, ns, 0)
	// inFlight leaves 1000 bytes sent and unacknowledged on cl (one skb:
	// the loopback MSS is larger) and returns what the peer would ACK with.
	inFlight := func(t *testing.T) (cl int, ack func(t *testing.T, s *Snapshot, n uint32)) {
		cl, _ = pair(t, ns, 0, nil, nil)
		peer, local := peerAndLocal(t, cl)
		nftLock(t, ns, local, peer, true, false)
		if _, err := unix.Write(cl, make([]byte, 1000)); err != nil {
			t.Fatal(err)
		}
		waitInfo(t, cl, "1000 bytes in flight", func(ti *tcpInfoHead) bool { return ti.Unacked == 1 })
		nftUnlock(t, ns)
		return cl, func(t *testing.T, s *Snapshot, n uint32) {
			t.Helper()
			una := s.SendSeq - 1000
			arrival(t, cl, func() error {
				return in.Send(Segment{From: peer, To: local, Seq: s.RecvSeq, Ack: una + n, Flags: SegACK, Window: 0xffff})
			})
		}
	}
	t.Run("hidden bytes", func(t *testing.T) {
		cl, ack := inFlight(t)
		s := inspected(t, ns, cl)
		var seqs Snapshot
		seqs.RecvSeq, seqs.SendSeq = peekSeqs(t, cl)
		ack(t, &seqs, 10)
		err := Capture(cl, s)
		if !errors.Is(err, ErrQueueMismatch) {
			t.Fatalf("Capture with a partly acknowledged skb: %v, want ErrQueueMismatch", err)
		}
	})
	t.Run("acknowledged under the peek", func(t *testing.T) {
		cl, ack := inFlight(t)
		s := inspected(t, ns, cl)
		calls, attempts := 0, 0
		var err error
		testHook = func(step string, fd int, s *Snapshot) {
			switch step {
			case "start":
				// The failed attempt must not leave the send queue
				// selected into the next one.
				if attempts++; attempts > 1 {
					if q, err := getInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE); err != nil || q != tcpNoQueue {
						t.Errorf("attempt %d starts with queue %d selected (%v), want none", attempts, q, err)
					}
				}
			case "peek":
				if calls++; calls == 1 {
					ack(t, s, 1000)
				}
			}
		}
		err = Capture(cl, s)
		testHook = nil
		if err != nil {
			t.Fatalf("Capture with the queue acknowledged under the peek: %v", err)
		}
		if calls != 1 || attempts != 2 || len(s.SendQueue) != 0 {
			t.Errorf("%d peeks of the send queue in %d attempts, %d bytes in it; want one peek (the retry finds it empty), two attempts and no bytes", calls, attempts, len(s.SendQueue))
		}
		if err := Resume(cl, s); err != nil {
			t.Fatal(err)
		}
	})
}

// peekSeqs reads rcv_nxt and write_seq of fd, briefly in repair mode.
func peekSeqs(t *testing.T, fd int) (rcvNxt, writeSeq uint32) {
	t.Helper()
	if err := setInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		t.Fatal(err)
	}
	defer setInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP)
	rcvNxt, writeSeq, op, err := queueSeqs(fd)
	if err != nil {
		t.Fatal(op, ": ", err)
	}
	return rcvNxt, writeSeq
}
