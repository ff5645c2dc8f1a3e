package repair

import (
	"errors"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// minChunk is the smallest write Restore falls back to when the kernel
// answers ENOMEM to a large queue write (old kernels build one linear
// buffer per call).
const minChunk = 1024

// Restore builds a socket for the connection s describes with a Restorer
// that has no Injector: enough for ESTABLISHED, SYN_SENT and FIN_WAIT1
// connections. See Restorer.Restore.
func Restore(s *Snapshot) (fd int, err error) {
	var r Restorer
	return r.Restore(s)
}

// Restorer rebuilds connections in every state Capture accepts. A zero
// Restorer restores the states that need no crafted segment; the others
// (State.NeedsInjection) need an Injector. A Restorer is safe for
// concurrent use if its Injector is.
type Restorer struct {
	// Injector sends the segments crafted as if from the peer (REPAIR-NOTES
	// 5.2). It must belong to the network namespace the sockets are
	// restored in and carry the mark that passes the lock there.
	Injector *Injector

	// Defaults, when set, are the options of a new socket in the
	// namespace the sockets are restored in (ReadDefaults): Restore
	// leaves an option alone where the source's value equals it.
	Defaults *Defaults
}

// Restore builds a socket for the connection s describes and returns its
// descriptor, still in repair mode (REPAIR-NOTES 4.1, steps R1 to R16, and
// the recipes of 5.1 for the other states).
//
// The caller must have locked the 4-tuple on this host first, so no early
// packet meets a half-built socket and nothing the socket emits escapes;
// the crafted segments pass the lock with the Injector's mark. The
// descriptor is non-blocking and close-on-exec. Once the lock is gone,
// Resume hands the connection to the kernel; Discard throws it away
// silently.
//
// The local address need not be configured on this host yet: if bind fails
// with EADDRNOTAVAIL, Restore marks the socket transparent (IP_TRANSPARENT
// or IPV6_TRANSPARENT), which lets both bind and the repair-mode connect
// succeed; Resume clears the flag again unless the source socket had it.
// The address must be local by the time the socket is resumed. A segment
// crafted for such a socket would be routed out of the host instead of
// reaching it, so Restore stops short of the first injection and Settle
// finishes the job once the address is local.
//
// A SYN_SENT connection is connected with repair off, so that its SYN
// (dropped by the lock) carries the original ISN; it is retransmitted by
// the kernel's SYN timer after the unlock.
//
// On error no descriptor is left open.
func (r *Restorer) Restore(s *Snapshot) (fd int, err error) {
	return r.restore(nil, s)
}

// restore is Restore, on b's socket if b (which it uses up) fits s.
func (r *Restorer) restore(b *Blank, s *Snapshot) (fd int, err error) {
	if err := s.Validate(); err != nil {
		b.Close()
		return -1, err
	}
	if s.State.NeedsInjection() && r.Injector == nil {
		b.Close()
		return -1, s.opErr("restore "+s.State.String(), ErrNoInjector)
	}
	if !b.Fits(s) { // a nil, zero or used Blank fits nothing
		b.Close()
		b = nil
	}
	notLocal := false
	var preset *presetValues // the options b already has
	if b != nil {
		fd, _ = b.take()
		notLocal = b.notLocal
		if b.presetOK {
			preset = &b.preset
		}
	} else if fd, err = unix.Socket(int(s.Family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP); err != nil {
		return -1, s.opErr("socket", err)
	}
	defer func() {
		if err != nil {
			unix.Close(fd) // in repair mode, or never connected: silent either way
			fd = -1
		}
	}()
	if b != nil {
		// Repair mode, IPV6_V6ONLY, the inflated buffers and the bind are
		// done; what the source set before its bind can follow it here
		// (fits ruled out the options that cannot).
		if op, err := writeRouteOptions(fd, s.Family, &s.Options); err != nil {
			return fd, s.opErr(op, err)
		}
	} else if notLocal, err = r.newSocket(fd, s); err != nil {
		return fd, err
	}
	if s.State == StateSynSent {
		return fd, restoreSynSent(fd, s)
	}

	// R7: queue start sequence numbers, before connect and before any data.
	// A FIN that the recipe re-creates later is not counted yet.
	recvFin, sendFin := finOffsets(s.State)
	if op, err := setQueueSeq(fd, tcpRecvQueue, s.RecvSeq-recvFin-uint32(len(s.RecvQueue))); err != nil {
		return fd, s.opErr(op, err)
	}
	if op, err := setQueueSeq(fd, tcpSendQueue, s.SendSeq-sendFin-uint32(len(s.SendQueue))); err != nil {
		return fd, s.opErr(op, err)
	}
	// R8: with repair on, connect sends nothing and goes straight to ESTABLISHED.
	if err := connectTo(fd, s.Family, s.Remote); err != nil {
		return fd, s.opErr("connect", err)
	}
	// R9, R10: negotiated options, then the timestamp clock.
	if err := setRepairOptions(fd, s); err != nil {
		return fd, s.opErr("setsockopt TCP_REPAIR_OPTIONS", err)
	}
	if s.Flags&FlagTimestamps != 0 {
		if err := writeTimestamp(fd, s); err != nil {
			return fd, s.opErr("setsockopt TCP_TIMESTAMP", err)
		}
	}
	// R11, R12: receive bytes, then sent-but-unacknowledged bytes. R7 left
	// the send queue selected.
	if len(s.RecvQueue) > 0 {
		if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue); err != nil {
			return fd, s.opErr("select receive queue", err)
		}
		if err := writeQueue(fd, s.RecvQueue); err != nil {
			return fd, s.opErr("write receive queue", err)
		}
	}
	if sent := s.SentUnacked(); len(sent) > 0 {
		if len(s.RecvQueue) > 0 {
			if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpSendQueue); err != nil {
				return fd, s.opErr("select send queue", err)
			}
		}
		if err := writeQueue(fd, sent); err != nil {
			return fd, s.opErr("write send queue", err)
		}
	}
	// R13: never-sent bytes go in with repair off, so they stay unsent. The
	// peer window is still 0 and the lock holds, so nothing leaves the host.
	// The socket is still ESTABLISHED, so it takes data (CRIU issue #2446).
	if unsent := s.NeverSent(); len(unsent) > 0 {
		if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, repairOffQuiet()); err != nil {
			return fd, s.opErr("leave repair for unsent data", err)
		}
		werr := writeQueue(fd, unsent)
		if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
			return fd, s.opErr("re-enter repair after unsent data", err)
		}
		if werr != nil {
			return fd, s.opErr("write unsent data", werr)
		}
		// Turning repair on again left no queue selected.
	} else if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue); err != nil {
		return fd, s.opErr("deselect queue", err)
	}
	// R14: the window, after the queues (the kernel checks it against
	// rcv_nxt). Until the peer's FIN is re-injected rcv_nxt is one lower:
	// the left edge moves down with it and the right edge stays.
	if s.Flags&FlagWindow != 0 {
		w := s.windowIn(StateEstablished)
		if err := setWindow(fd, &w); err != nil {
			return fd, s.opErr("setsockopt TCP_REPAIR_WINDOW", err)
		}
	}
	// R15: the half-close recipe, as far as it can go before the local
	// address is on this host. The repair-mode connect left the socket
	// ESTABLISHED (tcp_connect: tcp_finish_connect), so the recipe starts
	// there without reading it, an ESTABLISHED connection has none, and
	// verifyRestored reads the state the recipe reached.
	reached := StateEstablished
	if s.State != StateEstablished {
		if reached, err = r.advance(fd, s, StateEstablished, !notLocal); err != nil {
			return fd, err
		}
	}
	// R16: the remaining options, final buffer sizes and SO_BUF_LOCK bits.
	if op, err := writeLateOptions(fd, s.Family, &s.Options, r.Defaults, preset); err != nil {
		return fd, s.opErr(op, err)
	}
	// A received FIN shuts the read side by itself (and a SHUT_RD before a
	// re-injected FIN would make data in FIN_WAIT states reset the peer).
	if s.Shutdown&ShutRead != 0 && !s.State.peerFin() {
		if err := unix.Shutdown(fd, unix.SHUT_RD); err != nil {
			return fd, s.opErr("shutdown(SHUT_RD)", err)
		}
	}
	if err := verifyRestored(fd, s, reached); err != nil {
		return fd, s.opErr("verify restored socket", err)
	}
	return fd, nil
}

// newSocket does to a new socket what NewBlank does, with the source's
// early options: repair mode, the options that must precede bind, the
// inflated buffers (the final ones for SYN_SENT, whose SYN takes its window
// scale from them), and the bind. It reports whether the local address
// was not on this host (the socket was made transparent to bind it).
func (r *Restorer) newSocket(fd int, s *Snapshot) (notLocal bool, err error) {
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		return false, s.opErr("turn repair on", err)
	}
	if op, err := writeEarlyOptions(fd, s.Family, &s.Options); err != nil {
		return false, s.opErr(op, err)
	}
	if s.State == StateSynSent {
		if op, err := writeLateOptions(fd, s.Family, &s.Options, r.Defaults, nil); err != nil {
			return false, s.opErr(op, err)
		}
	} else if op, err := inflateBuffers(fd); err != nil {
		return false, s.opErr(op, err)
	}
	notLocal, op, err := bindLocal(fd, s.Family, s.Local)
	if err != nil {
		return false, s.opErr(op, err)
	}
	return notLocal, nil
}

// restoreSynSent rebuilds a SYN_SENT connection (REPAIR-NOTES 5.1): the
// send queue starts at the initial sequence number (one below the saved
// write_seq); a non-blocking connect with repair off then sends a SYN
// carrying that ISN, which the lock drops (the kernel keeps a non-zero
// write_seq as the ISN); back in repair mode the source's timestamp clock
// replaces the offset the connect picked, so the retransmitted SYN
// continues the clock a peer may have seen. The handshake completes after
// the unlock, at the SYN's retransmission.
func restoreSynSent(fd int, s *Snapshot) error {
	if op, err := setQueueSeq(fd, tcpSendQueue, s.SendSeq-1); err != nil {
		return s.opErr(op, err)
	}
	// No need to deselect the send queue: out of repair mode the selection
	// means nothing, and turning repair on again resets it.
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, repairOffQuiet()); err != nil {
		return s.opErr("leave repair for the SYN", err)
	}
	cerr := connectTo(fd, s.Family, s.Remote)
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		return s.opErr("re-enter repair after the SYN", err)
	}
	if cerr != nil {
		return s.opErr("connect (SYN_SENT)", cerr)
	}
	if err := writeTimestamp(fd, s); err != nil {
		return s.opErr("setsockopt TCP_TIMESTAMP", err)
	}
	if st, err := readState(fd); err != nil {
		return s.opErr("getsockopt TCP_INFO", err)
	} else if st != StateSynSent {
		return s.opErr("verify restored socket", ErrRestoreMismatch)
	}
	return nil
}

// setQueueSeq selects queue (tcpRecvQueue or tcpSendQueue) of fd, a new
// socket in repair mode, and sets its TCP_QUEUE_SEQ, where the queue
// starts. The queue stays selected; on error setQueueSeq names the failed
// operation.
func setQueueSeq(fd int, queue int32, seq uint32) (op string, err error) {
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, queue); err != nil {
		return "select " + queueName(queue) + " queue", err
	}
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, int32(seq)); err != nil {
		return "setsockopt TCP_QUEUE_SEQ (" + queueName(queue) + ")", err
	}
	return "", nil
}

// writeTimestamp sets the timestamp clock (TCP_TIMESTAMP) to s.Timestamp,
// with bit 0 set for a microsecond clock on kernels that read it (6.7+).
func writeTimestamp(fd int, s *Snapshot) error {
	ts := s.Timestamp
	if s.Flags&FlagUsecTS != 0 && kernelUsecTS() {
		ts |= 1
	}
	return setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP, int32(ts))
}

// setRepairOptions writes the negotiated options in one TCP_REPAIR_OPTIONS
// call: SACK, window scale and timestamps as negotiated, the MSS clamp always.
func setRepairOptions(fd int, s *Snapshot) error {
	var opts [4]unix.TCPRepairOpt
	n := 0
	if s.Flags&FlagSACK != 0 {
		opts[n] = unix.TCPRepairOpt{Code: unix.TCPOPT_SACK_PERMITTED}
		n++
	}
	if s.Flags&FlagWScale != 0 {
		opts[n] = unix.TCPRepairOpt{Code: unix.TCPOPT_WINDOW, Val: uint32(s.SndWScale) | uint32(s.RcvWScale)<<16}
		n++
	}
	if s.Flags&FlagTimestamps != 0 {
		opts[n] = unix.TCPRepairOpt{Code: unix.TCPOPT_TIMESTAMP}
		n++
	}
	opts[n] = unix.TCPRepairOpt{Code: unix.TCPOPT_MAXSEG, Val: s.MSSClamp}
	n++
	return setsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_OPTIONS, unsafe.Pointer(&opts[0]), uint32(n)*uint32(unsafe.Sizeof(opts[0])))
}

// writeQueue writes data to the selected queue, continuing after short
// writes and halving the chunk on ENOMEM. EAGAIN means the buffers are too
// small for the queue, which the restore inflated to avoid: it fails.
func writeQueue(fd int, data []byte) error {
	chunk := len(data)
	for len(data) > 0 {
		n, err := send(fd, data[:min(chunk, len(data))])
		switch {
		case errors.Is(err, unix.ENOMEM) && chunk > minChunk:
			chunk = max(chunk/2, minChunk)
			continue
		case err != nil:
			return err
		case n == 0:
			return unix.EAGAIN
		}
		data = data[n:]
	}
	return nil
}

// verifyRestored reads the queue lengths and the state back (REPAIR-NOTES
// 4.7) and checks them against s and want, the state the recipe reached.
//
// The socket is read as Capture reads one (captureLengths): one TCP_INFO
// gives its state and never-sent length, and SIOCOUTQ is needed only with
// data in flight, so an idle one costs two calls instead of the four of
// the three queue ioctls and a state read. In CLOSE SIOCOUTQ is not read
// either: a restored socket reaches CLOSE only when the crafted ACK of our
// FIN makes snd_una equal write_seq (tcp_rcv_state_process, LAST_ACK), so
// the state says what the length would.
func verifyRestored(fd int, s *Snapshot, want State) error {
	var ti tcpInfoHead
	if err := getInfoRaw(fd, &ti); err != nil {
		return err
	}
	st := State(ti.State)
	outq, unsq, inq, op, err := captureLengths(fd, st, &ti)
	if err != nil {
		return errors.New(op + ": " + err.Error())
	}
	// Our FIN, queued and not acknowledged, counts in both lengths (in
	// the never-sent one only while it is unsent), exactly as at the
	// source.
	wantOut, wantUnsent := uint32(len(s.SendQueue)), s.Unsent
	switch want {
	case StateFinWait1, StateClosing, StateLastAck:
		wantOut++
		if s.Flags&FlagFINUnsent != 0 {
			wantUnsent++
		}
	case StateClose:
		wantOut = 0
	}
	if st != want || uint32(outq) != wantOut || uint32(unsq) != wantUnsent || int(inq) != len(s.RecvQueue) {
		return ErrRestoreMismatch
	}
	return nil
}

// repairOffQuiet is the TCP_REPAIR value that leaves repair mode without
// a window probe: TCP_REPAIR_OFF_NO_WP (4.18+); older kernels take only
// the plain value.
var repairOffQuiet = sync.OnceValue(func() int32 {
	if kernelAtLeast(4, 18) {
		return unix.TCP_REPAIR_OFF_NO_WP
	}
	return unix.TCP_REPAIR_OFF
})

// Resume takes the socket out of repair mode and puts back what repair mode
// changed: SO_REUSEADDR (cleared by repair-off), SO_PEEK_OFF, and the
// transparent flag Restore may have set. Leaving repair sends a window probe
// that re-synchronises the peer (in ESTABLISHED only), so the lock must
// already be gone.
//
// Resume serves both ends: on the source it rolls back a dumped socket,
// in any state; on the target it is the commit of a restored one, where
// Restorer.Resume does better for the half-closed states (it probes them).
//
// An error matching ErrResumedLive comes after the socket left repair
// mode: it is live (deliver or close it, never Discard it). Any other
// error leaves it in repair mode.
func Resume(fd int, s *Snapshot) error {
	return resume(fd, s, unix.TCP_REPAIR_OFF)
}

func resume(fd int, s *Snapshot, mode int32) error {
	if err := repairOff(fd, s, mode); err != nil {
		return err
	}
	return Finish(fd, s)
}

// repairOff turns repair mode off with mode (TCP_REPAIR_OFF or
// TCP_REPAIR_OFF_NO_WP).
func repairOff(fd int, s *Snapshot, mode int32) error {
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, mode); err != nil {
		return s.opErr("turn repair off", err)
	}
	return nil
}

// liveError is the error of a step that failed after the socket left
// repair mode: it matches ErrResumedLive and err.
func liveError(s *Snapshot, op string, err error) error {
	return s.opErr(op+" after leaving repair mode", &resumedLiveError{err})
}

// resumedLiveError wraps the error of a step after repair mode was left.
type resumedLiveError struct{ err error }

func (e *resumedLiveError) Error() string { return e.err.Error() + " (the socket is live)" }

func (e *resumedLiveError) Unwrap() []error { return []error{ErrResumedLive, e.err} }

// Finish puts back, on a socket just out of repair mode (Restorer.Wake),
// what repair mode changed: SO_REUSEADDR and SO_PEEK_OFF as the snapshot
// has them, and IP_TRANSPARENT (IPV6_TRANSPARENT) cleared unless the
// source socket had it (the restore may have set it to bind before the
// address was local). Its errors match ErrResumedLive: the socket is live
// whatever happens here.
func Finish(fd int, s *Snapshot) error {
	if s.Options.ReuseAddr {
		if err := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return liveError(s, "setsockopt SO_REUSEADDR", err)
		}
	}
	if s.Options.Mask&OptPeekOff != 0 {
		if err := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, s.Options.PeekOff); err != nil {
			return liveError(s, "setsockopt SO_PEEK_OFF", err)
		}
	}
	if s.Options.Mask&OptTransparent == 0 {
		level, transparent, _ := ipLevel(s.Family)
		if err := setIntRaw(fd, level, transparent, 0); err != nil {
			return liveError(s, "clear IP_TRANSPARENT", err)
		}
	}
	return nil
}

// Discard closes fd silently: it makes sure the socket is in repair mode
// and closes it, and the kernel then tears the connection down without a
// FIN or a RST. The connection dies only when every descriptor of the
// socket is closed (a copy held by another process keeps it alive), and it
// must stay locked until then.
func Discard(fd int) error {
	err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON)
	cerr := unix.Close(fd)
	if err != nil {
		return &OpError{Op: "discard: turn repair on", Err: err}
	}
	if cerr != nil {
		return &OpError{Op: "discard: close", Err: cerr}
	}
	return nil
}
