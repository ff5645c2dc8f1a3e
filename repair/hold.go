package repair

import (
	"errors"
	"time"

	"golang.org/x/sys/unix"
)

// The zero-window hold (REPAIR-NOTES 10.3, 10.4). A peer that sends while
// the lock drops its segments recovers only at its retransmission timer,
// at least 200 ms later. Held instead, it stops sending before the lock and
// waits in zero-window persist mode, and resumes within a round trip of
// the kick. In order:
//
//	source:  (firewall: hold, egress window rewritten to 0) → Announce →
//	         Drain → (firewall: lock) → Dump → MarkHeld
//	target:  Restore → (unlock) → ResumeHeld → Kick
//
// The firewall's part is in package firewall (Lock.Hold).

// Drain timing, from the measurements of REPAIR-NOTES 10.4.
const (
	// drainTick is how often Drain forces ACKs and looks at the counters.
	drainTick = 500 * time.Microsecond
	// drainQuiet is the shortest time a connection's received-byte count
	// must stand still for Drain to call it settled; a connection with a
	// longer round trip waits 1.5 × its smoothed RTT instead.
	drainQuiet = 2 * time.Millisecond
)

// Drain waits until nothing the peers of fds sent is still in flight: the
// connections must be held (every segment they send advertises a window of
// 0) and not yet locked. In one loop over all of them it forces an
// immediate ACK on each (TCP_QUICKACK), so that each peer learns of the
// zero window without waiting for a delayed ACK, and reads
// tcpi_bytes_received, every half millisecond, until each connection's
// count has stood still for max(2 ms, 1.5 × srtt). It gives up at limit
// and returns how many connections were still receiving then (the lock
// drops what they still send, as without the hold). An error names the
// first socket that could not be read; the others were still drained.
func Drain(fds []int, limit time.Duration) (unsettled int, err error) {
	type state struct {
		last    uint64
		changed time.Time
		done    bool
	}
	st := make([]state, len(fds))
	start := time.Now()
	for i := range st {
		st[i].changed = start
	}
	pending := len(fds)
	for first := true; pending > 0; first = false {
		tick := time.Now()
		for i, fd := range fds {
			s := &st[i]
			if s.done {
				continue
			}
			var info tcpInfoHead
			if e := getInfo(fd, &info); e != nil {
				s.done, pending = true, pending-1
				err = errors.Join(err, drainError(fd, "drain: getsockopt TCP_INFO", e))
				continue
			}
			now := time.Now()
			quiet := max(drainQuiet, time.Duration(info.RTT)*time.Microsecond*3/2)
			switch {
			case first || info.BytesReceived != s.last:
				s.last, s.changed = info.BytesReceived, now
			case now.Sub(s.changed) >= quiet:
				s.done, pending = true, pending-1
				continue
			}
			if e := setInt(fd, unix.IPPROTO_TCP, unix.TCP_QUICKACK, 1); e != nil {
				s.done, pending = true, pending-1
				err = errors.Join(err, drainError(fd, "drain: setsockopt TCP_QUICKACK", e))
			}
		}
		if pending == 0 || time.Since(start) >= limit {
			break
		}
		time.Sleep(drainTick - time.Since(tick))
	}
	return pending, err
}

func drainError(fd int, op string, err error) error {
	local, _ := sockname(fd, false)
	remote, _ := sockname(fd, true)
	return &OpError{Op: op, Local: local, Remote: remote, Err: err}
}

// MarkHeld records in s, just dumped from a held connection (see Drain),
// that its peer believes our window is 0 from rcv_nxt on: it sets FlagHeld,
// Window.RcvWnd to 0 and Window.RcvWup to RecvSeq, so that the restored
// socket starts from the peer's view rather than from the window it last
// meant to advertise. Only ESTABLISHED connections are held (in the other
// states a FIN has passed, and sequence numbers carry its corrections);
// MarkHeld leaves any other snapshot alone and reports whether it marked s.
func (s *Snapshot) MarkHeld() bool {
	if s.State != StateEstablished {
		return false
	}
	s.Flags |= FlagHeld
	s.Window.RcvWnd = 0
	s.Window.RcvWup = s.RecvSeq
	return true
}

// ResumeHeld is Resume for a socket restored from a held snapshot: it
// leaves repair mode without the window probe (the probe's sequence number
// is snd_una - 1, which the peer drops without reading its window, and it
// makes the kernel believe the open window was announced). Kick the socket
// next, once its lock is gone. Its errors are Resume's (ErrResumedLive: the
// socket is live).
func ResumeHeld(fd int, s *Snapshot) error {
	return resume(fd, s, repairOffQuiet())
}

// KickSegment returns the kick of the connection of s: a segment as from
// the peer, ACK, seq = rcv_nxt - 1, ack = snd_nxt, window 0. Being just
// outside the receive window it is dropped, and the socket answers it at
// once with a duplicate ACK that carries its real, open window: the held
// peer resumes sending on receiving it.
func KickSegment(s *Snapshot) Segment {
	local, remote := s.Tuple()
	return Segment{From: remote, To: local, Seq: s.RecvSeq - 1, Ack: s.SendSeq - s.Unsent, Flags: SegACK}
}

// Kick sends the kick (KickSegment) of every held snapshot of snaps through
// in, whose namespace must be the restored sockets'; snapshots without
// FlagHeld are skipped. The sockets must be out of repair mode (ResumeHeld)
// and unlocked. It returns the failures joined, each naming its connection;
// a connection whose kick was lost waits for its peer's persist probe.
func Kick(in *Injector, snaps ...*Snapshot) error {
	var err error
	for _, s := range snaps {
		if s.Flags&FlagHeld == 0 {
			continue
		}
		err = errors.Join(err, in.Send(KickSegment(s)))
	}
	return err
}

// AckNow makes the socket on fd, kicked a moment ago, acknowledge at once
// what its peer sent since (TCP_QUICKACK). A held peer answers the kick
// with its backlog, which fills the restored receive window in one burst;
// while nobody reads the socket its window cannot grow, and the kernel
// holds that ACK for its delayed-ACK timer, 40 ms or more, and leaves the
// peer waiting (docs/performance.md §11.3). Call it once the burst has had
// a round trip to arrive, before the socket goes to its application; it
// is harmless for a socket with nothing to acknowledge. Any error is the
// setsockopt's: the socket is live either way.
func AckNow(fd int) error {
	return setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_QUICKACK, 1)
}

// Announce makes the socket on fd, just held and not yet locked, send an
// ACK at once, which the hold rewrites to advertise window 0. Drain's
// forced ACKs go out only when one is due (data came in unacknowledged):
// a peer that happens to be idle when the hold begins would otherwise
// learn of the zero window only from the ACK of its next segment, and if
// that segment comes after the lock it is dropped.
//
// The ACK is the answer to a crafted segment just below the receive window
// (as Kick's), sent through in, which must belong to the socket's
// namespace. Building it needs rcv_nxt, which only repair mode reads: the
// socket enters repair mode for the few system calls that read its
// sequence numbers and leaves it without a window probe; SO_REUSEADDR,
// which leaving clears, is put back from s, the socket's inspected
// snapshot (Inspect). The queue selection is left for Capture to set.
func Announce(in *Injector, fd int, s *Snapshot) error {
	opErr := func(op string, err error) error {
		return &OpError{Op: "announce: " + op, Local: s.Local, Remote: s.Remote, Err: err}
	}
	if err := setInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		return opErr("turn repair on", err)
	}
	rcvNxt, sndNxt, op, err := liveSeqs(fd)
	if rerr := leaveLive(fd, s); rerr != nil {
		return errors.Join(opErr(op, err), rerr)
	}
	if err != nil {
		return opErr(op, err)
	}
	local, remote := s.Tuple()
	return in.Send(Segment{From: remote, To: local, Seq: rcvNxt - 1, Ack: sndNxt, Flags: SegACK})
}

// leaveLive takes a live socket that entered repair mode for a moment
// (Announce, Precapture) out of it without a window probe, and puts back
// SO_REUSEADDR, which leaving clears, from s, its inspected snapshot.
// Nothing else Inspect read changes (SO_PEEK_OFF is Capture's to put back;
// the transparent flag is Restore's).
func leaveLive(fd int, s *Snapshot) error {
	if err := setInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, repairOffQuiet()); err != nil {
		return s.opErr("turn repair off", err)
	}
	if s.Options.ReuseAddr {
		if err := setInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return s.opErr("setsockopt SO_REUSEADDR", err)
		}
	}
	return nil
}

// liveSeqs reads rcv_nxt and snd_nxt of a socket in repair mode, leaving
// the send queue selected.
func liveSeqs(fd int) (rcvNxt, sndNxt uint32, op string, err error) {
	rcvNxt, writeSeq, op, err := queueSeqs(fd)
	if err != nil {
		return 0, 0, op, err
	}
	unsent, err := ioctlInt(fd, unix.SIOCOUTQNSD)
	if err != nil {
		return 0, 0, "ioctl SIOCOUTQNSD", err
	}
	return rcvNxt, writeSeq - uint32(unsent), "", nil
}

// queueSeqs reads rcv_nxt and write_seq (TCP_QUEUE_SEQ of the receive and
// the send queue) of a socket in repair mode, leaving the send queue
// selected; on error it names the failed operation. It goes through the
// scheduler, for Announce's live socket; queueSeq is the raw form (sys.go).
func queueSeqs(fd int) (rcvNxt, writeSeq uint32, op string, err error) {
	if err := setInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue); err != nil {
		return 0, 0, "select the receive queue", err
	}
	r, err := getInt(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ)
	if err != nil {
		return 0, 0, "read rcv_nxt", err
	}
	if err := setInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpSendQueue); err != nil {
		return 0, 0, "select the send queue", err
	}
	w, err := getInt(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ)
	if err != nil {
		return 0, 0, "read write_seq", err
	}
	return uint32(r), uint32(w), "", nil
}
