package repair

import (
	"errors"
	"time"

	"golang.org/x/sys/unix"
)

// injectWait bounds the wait for a crafted segment to take effect, and
// resendEvery is how long one copy is given before another is sent. The
// loopback path usually delivers it before sendto returns; a busy machine
// may leave it to the softirq thread for a while. And an IPv6 address
// added a moment ago (even without duplicate address detection) seems to
// be usable for bind before its local route exists (the kernel installs
// the route from the address's DAD work item), and a segment sent before
// that is routed out of the host: a test saw a crafted FIN lost once. Copies that arrive after the first took effect are old segments
// to the socket (or, after CLOSE, hit no socket at all, and the lock
// drops the reset): harmless.
const (
	injectWait  = 500 * time.Millisecond
	resendEvery = 10 * time.Millisecond
)

// A step of a half-close recipe (REPAIR-NOTES 5.1): from one state to the
// next by a shutdown or a crafted segment.
type closeStep uint8

const (
	stepShutdownUnsent closeStep = iota + 1 // shutdown(SHUT_WR) behind a zero peer window: our FIN is queued, never sent
	stepShutdownSent                        // shutdown(SHUT_WR) with the send queue selected: our FIN is recorded as sent, nothing is transmitted
	stepPeerFin                             // crafted FIN+ACK from the peer, not acknowledging our FIN
	stepAckOurFin                           // crafted ACK from the peer acknowledging our FIN
)

// nextStep returns the step that takes a socket rebuilt for target one
// state further from cur, and the state it leads to. ok is false when cur
// is not on the way to target. finUnsent says whether our FIN had been
// transmitted at the source (FlagFINUnsent): a FIN the peer may hold is
// restored as sent, so that the peer's acknowledgement of it is accepted
// and, if the peer lacks it, it is retransmitted; a FIN that never left is
// restored as unsent, so that the stack sends it when the window allows.
func nextStep(cur, target State, finUnsent bool) (step closeStep, next State, ok bool) {
	shutdown := stepShutdownSent
	if finUnsent {
		shutdown = stepShutdownUnsent
	}
	switch target {
	case StateFinWait1:
		if cur == StateEstablished {
			return shutdown, StateFinWait1, true
		}
	case StateFinWait2:
		switch cur {
		case StateEstablished:
			return stepShutdownSent, StateFinWait1, true
		case StateFinWait1:
			return stepAckOurFin, StateFinWait2, true
		}
	case StateClosing:
		switch cur {
		case StateEstablished:
			return shutdown, StateFinWait1, true
		case StateFinWait1:
			return stepPeerFin, StateClosing, true
		}
	case StateCloseWait:
		if cur == StateEstablished {
			return stepPeerFin, StateCloseWait, true
		}
	case StateLastAck:
		switch cur {
		case StateEstablished:
			return stepPeerFin, StateCloseWait, true
		case StateCloseWait:
			return shutdown, StateLastAck, true
		}
	case StateClose:
		switch cur {
		case StateEstablished:
			return stepPeerFin, StateCloseWait, true
		case StateCloseWait:
			return stepShutdownSent, StateLastAck, true
		case StateLastAck:
			return stepAckOurFin, StateClose, true
		}
	}
	return 0, 0, false
}

// advance runs the half-close recipe of s.State on a socket rebuilt as
// ESTABLISHED (or part of the way), in state cur, step by step, re-reading
// the state after each step and failing on a mismatch (REPAIR-NOTES 5.2).
// With inject false it stops before the first crafted segment. It returns
// the state reached. Before it returns, the saved window is written again
// (with the correction of 5.1 while the peer's FIN is still missing) and
// read back: the zero window of an unsent FIN, the acknowledgements the
// socket tried to send and the crafted segments all move it.
func (r *Restorer) advance(fd int, s *Snapshot, cur State, inject bool) (State, error) {
	var err error
	for cur != s.State {
		step, next, ok := nextStep(cur, s.State, s.Flags&FlagFINUnsent != 0)
		if !ok {
			return cur, s.opErr("restore "+s.State.String()+" from "+cur.String(), ErrRestoreMismatch)
		}
		switch step {
		case stepShutdownUnsent:
			w := s.windowIn(cur)
			w.SndWnd = 0 // nothing may go out, the lock's drop notwithstanding
			if err := setWindow(fd, &w); err != nil {
				return cur, s.opErr("setsockopt TCP_REPAIR_WINDOW (zero window for the FIN)", err)
			}
			if err := unix.Shutdown(fd, unix.SHUT_WR); err != nil {
				return cur, s.opErr("shutdown(SHUT_WR)", err)
			}
		case stepShutdownSent:
			if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpSendQueue); err != nil {
				return cur, s.opErr("select send queue", err)
			}
			serr := unix.Shutdown(fd, unix.SHUT_WR)
			if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue); err != nil {
				return cur, s.opErr("deselect queue", err)
			}
			if serr != nil {
				return cur, s.opErr("shutdown(SHUT_WR)", serr)
			}
		case stepPeerFin, stepAckOurFin:
			if !inject {
				return cur, r.rewindow(fd, s, cur)
			}
			if r.Injector == nil {
				return cur, s.opErr("restore "+s.State.String(), ErrNoInjector)
			}
			if cur, err = r.inject(fd, craft(s, step), next); err != nil {
				return cur, err
			}
		}
		if step == stepShutdownUnsent || step == stepShutdownSent {
			if cur, err = readState(fd); err != nil {
				return cur, s.opErr("getsockopt TCP_INFO", err)
			}
		}
		if cur != next {
			return cur, s.opErr("restore "+s.State.String()+": "+stepName(step)+" left the socket in "+cur.String()+", not "+next.String(), ErrRestoreMismatch)
		}
	}
	return cur, r.rewindow(fd, s, cur)
}

// inject sends seg and waits until the socket is in state want, sending it
// again every resendEvery, for up to injectWait. It returns the last state
// read.
func (r *Restorer) inject(fd int, seg Segment, want State) (State, error) {
	deadline := time.Now().Add(injectWait)
	for {
		if err := r.Injector.Send(seg); err != nil {
			return 0, err
		}
		next := time.Now().Add(resendEvery)
		for delay := 20 * time.Microsecond; ; delay = min(2*delay, 2*time.Millisecond) {
			st, err := readState(fd)
			if err != nil {
				return st, &OpError{Op: "getsockopt TCP_INFO", Local: seg.To, Remote: seg.From, Err: err}
			}
			if st == want || time.Now().After(deadline) {
				return st, nil
			}
			if time.Now().After(next) {
				break
			}
			time.Sleep(delay)
		}
	}
}

// windowIn returns the saved window as a socket rebuilt for s in state cur
// must hold it: while the peer's FIN is not re-injected yet, rcv_nxt is
// one lower, so rcv_wup is one lower and rcv_wnd one larger, which keeps
// the right edge (REPAIR-NOTES 5.1).
func (s *Snapshot) windowIn(cur State) Window {
	w := s.Window
	if s.State.peerFin() && !cur.peerFin() {
		w.RcvWup--
		w.RcvWnd++
	}
	return w
}

// rewindow writes the saved window on a socket that advance left in state
// cur (windowIn) and reads it back. A CLOSE socket has no window to keep.
func (r *Restorer) rewindow(fd int, s *Snapshot, cur State) error {
	if cur == StateClose {
		return nil
	}
	w := s.windowIn(cur)
	if err := setWindow(fd, &w); err != nil {
		return s.opErr("setsockopt TCP_REPAIR_WINDOW (after the half-close)", err)
	}
	var got Window
	if err := getWindow(fd, &got); err != nil {
		return s.opErr("getsockopt TCP_REPAIR_WINDOW", err)
	}
	if got != w {
		return s.opErr("verify window after the half-close", ErrRestoreMismatch)
	}
	return nil
}

// craft builds the segment of a step as the peer would have sent it
// (REPAIR-NOTES 5.2). Sequence numbers follow from the snapshot: the peer's
// FIN sits one below the saved rcv_nxt and acknowledges our snd_una
// without our FIN; the acknowledgement of our FIN comes after the peer's
// FIN, if any, and covers write_seq. The window field carries the peer's
// own advertisement (snd_wnd >> snd_wscale), so that the socket's view of
// the peer's window stays what it was.
func craft(s *Snapshot, step closeStep) Segment {
	local, remote := s.Tuple()
	_, sendFin := finOffsets(s.State)
	seg := Segment{From: remote, To: local, Flags: SegACK, Window: peerWindowField(s)}
	switch step {
	case stepPeerFin:
		seg.Flags |= SegFIN
		seg.Seq = s.RecvSeq - 1
		seg.Ack = s.SendSeq - sendFin - uint32(len(s.SendQueue))
	case stepAckOurFin:
		seg.Seq = s.RecvSeq
		seg.Ack = s.SendSeq
	}
	return seg
}

// peerWindowField is the peer's advertised window as its header carried
// it: snd_wnd scaled down by snd_wscale, capped to 16 bits.
func peerWindowField(s *Snapshot) uint16 {
	w := s.Window.SndWnd
	if s.Flags&FlagWScale != 0 {
		w >>= s.SndWScale
	}
	return uint16(min(w, 0xffff))
}

func stepName(s closeStep) string {
	switch s {
	case stepShutdownUnsent:
		return "shutdown(SHUT_WR) behind a zero window"
	case stepShutdownSent:
		return "shutdown(SHUT_WR) on the send queue"
	case stepPeerFin:
		return "the crafted FIN+ACK"
	case stepAckOurFin:
		return "the crafted ACK of our FIN"
	}
	return "step"
}

// Settle finishes the restore of a connection whose local address was not
// on this host when Restore ran (Restore stopped before the first crafted
// segment, which would have been routed away). Call it once the address
// is local and while the lock still holds, before Resume. It does nothing
// for a connection that is already complete, and costs no system call for
// the states that never need a crafted segment.
func (r *Restorer) Settle(fd int, s *Snapshot) error {
	if !s.State.NeedsInjection() {
		return nil
	}
	cur, err := readState(fd)
	if err != nil {
		return s.opErr("getsockopt TCP_INFO", err)
	}
	if cur == s.State {
		return nil
	}
	_, err = r.advance(fd, s, cur, true)
	return err
}

// Resume is the package's Resume for a socket the Restorer rebuilt, after
// the lock is gone:
//
//   - ESTABLISHED: repair off; the kernel's window probe re-synchronises
//     the peer.
//   - SYN_SENT: repair off; the kernel's SYN timer retransmits the SYN
//     with the original initial sequence number and the source's clock.
//   - FIN_WAIT1, FIN_WAIT2, CLOSING, CLOSE_WAIT, LAST_ACK: the kernel sends
//     no probe outside ESTABLISHED, so Resume sends one of its own (a bare
//     ACK carrying snd_una-1, as the kernel's probe does) with the
//     Injector; the peer answers with its current acknowledgement and
//     window. Without an Injector the connection relies on its timers.
//   - CLOSE: repair off; there is nobody left to talk to.
//   - held (FlagHeld, ESTABLISHED only) with an Injector: ResumeHeld, then
//     Kick, so that the held peer learns the open window at once.
//
// The probe and the kick are sent as soon as the socket is out of repair
// mode, before the options that leaving repair cleared are put back: the
// peer waits for the segment, while the options matter only to the
// application, which does not have the socket yet. Losing the segment
// only slows the connection down: a send that fails returns an error
// matching ErrResumedLive, as does a failure to put back an option (the
// socket is live: deliver it or close it, never Discard it). Any other
// error leaves the socket in repair mode.
//
// Resume is Wake followed by Finish. A caller that resumes many
// connections at once can instead Wake them all and then Finish them all,
// so that no connection's freeze waits for another's options.
func (r *Restorer) Resume(fd int, s *Snapshot) error {
	err := r.Wake(fd, s)
	if err != nil && !errors.Is(err, ErrResumedLive) {
		return err // still in repair mode
	}
	return errors.Join(err, Finish(fd, s))
}

// Wake is the part of Resume that ends the connection's freeze: it turns
// repair off and sends the kick or the probe that Resume's table gives
// for the connection's state. What leaving repair mode cleared is not put
// back: call Finish next (the socket works without it, and the
// application does not have it yet). An error matching ErrResumedLive
// means the socket is live (the segment was lost); any other leaves it in
// repair mode.
func (r *Restorer) Wake(fd int, s *Snapshot) error {
	mode := int32(unix.TCP_REPAIR_OFF)
	var seg Segment
	var what string
	switch {
	case r.Injector == nil:
		return repairOff(fd, s, mode)
	case s.Flags&FlagHeld != 0:
		// ResumeHeld, then the kick.
		seg, mode = KickSegment(s), repairOffQuiet()
		what = "kick (the peer waits for its persist probe)"
	case s.State == StateEstablished, s.State == StateSynSent, s.State == StateClose:
		return repairOff(fd, s, mode)
	default:
		var err error
		if seg, err = probeSegment(fd, s); err != nil {
			return s.opErr("read sequence numbers for the probe", err)
		}
		what = "send the window probe (the connection waits for its timers)"
	}
	if err := repairOff(fd, s, mode); err != nil {
		return err
	}
	if err := r.Injector.Send(seg); err != nil {
		return liveError(s, what, err)
	}
	return nil
}

// probeSegment builds the ACK the kernel's repair-off window probe would
// have been: from the local end, sequence snd_una-1 (already acknowledged,
// so the peer answers at once), acknowledging rcv_nxt, advertising our
// receive window. The socket must be in repair mode.
func probeSegment(fd int, s *Snapshot) (Segment, error) {
	local, remote := s.Tuple()
	// The send queue stays selected: Resume turns repair off next, and the
	// selection means nothing out of repair mode (turning repair on again
	// resets it).
	rcvNxt, _, err := queueSeq(fd, tcpRecvQueue)
	if err != nil {
		return Segment{}, err
	}
	writeSeq, _, err := queueSeq(fd, tcpSendQueue)
	if err != nil {
		return Segment{}, err
	}
	outq, err := ioctlIntRaw(fd, unix.SIOCOUTQ)
	if err != nil {
		return Segment{}, err
	}
	var w Window
	if err := getWindow(fd, &w); err != nil {
		return Segment{}, err
	}
	win := w.RcvWnd
	if s.Flags&FlagWScale != 0 {
		win >>= s.RcvWScale
	}
	return Segment{From: local, To: remote, Seq: writeSeq - uint32(outq) - 1, Ack: rcvNxt,
		Flags: SegACK, Window: uint16(min(win, 0xffff))}, nil
}
