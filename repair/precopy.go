package repair

import (
	"time"

	"golang.org/x/sys/unix"
)

// Pre-copies (docs/repair.md, "Pre-copies"): a held connection whose peer
// has nothing in flight stands still until something reaches it or leaves
// it, so its snapshot can be taken before the lock, while the connection is
// live, and restored on the target ahead of the freeze. After the lock one
// TCP_INFO read tells whether the copy still stands: the counters that
// Capture compares to see a segment get past its lock, and the segments
// sent, are those of the copy. Only a connection that moved meanwhile is
// captured again inside the freeze.

// A Mark is what Precapture saw of a connection's counters when it took the
// copy; Unchanged compares the connection with it.
type Mark struct {
	info tcpInfoHead
	inq  int32 // bytes in the receive queue, when the copy had any
	ok   bool  // the copy was taken
}

// Taken reports whether m is the mark of a copy (the zero Mark is not).
func (m *Mark) Taken() bool { return m.ok }

// Precapture dumps an ESTABLISHED connection into s as Capture does, then
// takes it out of repair mode again without a window probe and puts back
// what repair mode changed (SO_REUSEADDR, SO_PEEK_OFF), so that the socket
// goes on as before: it sends nothing of its own. The Mark it returns is for
// Unchanged, after the lock. A connection with bytes in flight or never
// sent is not copied (ErrBusy). On error the socket is out of repair mode (or,
// if even that failed, the error says so) and s must not be used; a
// connection in another state fails with an *UnsupportedError.
//
// It is meant for held connections (Announce, Drain): their peer sends
// nothing, and the copy then stands until the lock.
func Precapture(fd int, s *Snapshot) (Mark, error) {
	var m Mark
	// Bytes in flight or never sent: the capture selects the send queue,
	// and an ACK or window update that reached the live socket meanwhile
	// would run tcp_write_xmit's repair path, which marks never-sent bytes
	// sent without sending them (the peer would wait for a retransmission
	// timeout). Such a connection moves anyway: it is captured under the
	// lock.
	var ti tcpInfoHead
	if err := getInfoRaw(fd, &ti); err != nil {
		return m, s.opErr("pre-copy: getsockopt TCP_INFO", err)
	}
	if ti.NotsentBytes > 0 || ti.Unacked > 0 {
		return m, s.opErr("pre-copy", ErrBusy)
	}
	// Checked again after the capture: the state can change meanwhile.
	if st := State(ti.State); st != StateEstablished {
		return m, &UnsupportedError{Local: s.Local, Remote: s.Remote, Reason: ReasonState, Detail: "pre-copy of " + st.String()}
	}
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		return m, s.opErr("pre-copy: turn repair on", err)
	}
	err := func() error {
		if s.Options.Mask&OptPeekOff != 0 {
			if err := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, -1); err != nil {
				return s.opErr("pre-copy: clear SO_PEEK_OFF", err)
			}
		}
		if err := captureRetry(fd, s, &m.info); err != nil {
			return err
		}
		if s.State != StateEstablished {
			return &UnsupportedError{Local: s.Local, Remote: s.Remote, Reason: ReasonState, Detail: "pre-copy of " + s.State.String()}
		}
		return nil
	}()
	// Out of repair mode, quietly, whatever happened: the socket is live
	// until the lock. SO_PEEK_OFF, which the capture cleared, goes back.
	rerr := leaveLive(fd, s)
	if rerr == nil && s.Options.Mask&OptPeekOff != 0 {
		if perr := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, s.Options.PeekOff); perr != nil {
			rerr = s.opErr("pre-copy: setsockopt SO_PEEK_OFF", perr)
		}
	}
	if rerr != nil && err == nil {
		err = rerr
	}
	if err != nil {
		return Mark{}, err
	}
	m.inq = int32(len(s.RecvQueue))
	m.ok = true
	return m, nil
}

// Unchanged turns repair mode on for a connection pre-copied with mark m
// (Precapture) and reports whether its copy still stands: no segment reached
// it or left it, no byte was acknowledged, received or queued, its state is
// the same, and its receive queue holds what it held. Either way the socket
// is left in repair mode with no queue selected, as Capture leaves it: a
// connection that moved is then captured again (Recapture). On error the
// socket is out of repair mode again, with what leaving it cleared put back,
// as Capture leaves a socket it failed. Call it under the lock, once nothing
// reaches the socket.
func Unchanged(fd int, s *Snapshot, m *Mark) (same bool, err error) {
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		return false, s.opErr("turn repair on", err)
	}
	defer func() {
		if err != nil {
			_ = resume(fd, s, repairOffQuiet())
		}
	}()
	if !m.ok {
		return false, nil
	}
	var now tcpInfoHead
	if err := getInfoRaw(fd, &now); err != nil {
		return false, s.opErr("getsockopt TCP_INFO", err)
	}
	if whatMoved(&m.info, &now) != "" || m.info.SegsOut != now.SegsOut {
		return false, nil
	}
	// A read by a program that should not hold the socket any more moves
	// nothing TCP_INFO shows; SIOCINQ sees it where there was data.
	if m.inq > 0 {
		inq, err := ioctlIntRaw(fd, unix.SIOCINQ)
		if err != nil {
			return false, s.opErr("ioctl SIOCINQ", err)
		}
		if inq != m.inq {
			return false, nil
		}
	}
	return true, nil
}

// SinceData returns how long ago the connection on fd last sent or
// received data, whichever is later (TCP_INFO's last_data_sent and
// last_data_recv, in milliseconds): a connection quiet for long is one
// whose pre-copy is likely to stand.
func SinceData(fd int) (time.Duration, error) {
	var ti tcpInfoHead
	if err := getInfo(fd, &ti); err != nil {
		return 0, &OpError{Op: "getsockopt TCP_INFO", Err: err}
	}
	return time.Duration(min(ti.LastDataSent, ti.LastDataRecv)) * time.Millisecond, nil
}
