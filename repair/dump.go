package repair

import (
	"errors"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxCaptureAttempts bounds the re-reads when the counters move under a dump.
const maxCaptureAttempts = 3

// Dump fills s with the state of the connection on fd: Inspect, then Capture.
//
// The caller must already have locked the connection (dropped its packets
// in both directions on this host) and stopped its owner from using it.
// On success the socket is left locked and in repair mode: Discard it once
// the target owns the connection, or Resume it to roll back. On error the
// socket is back out of repair mode, as it was.
//
// Dump reuses the capacity of s.RecvQueue and s.SendQueue, so a caller that
// recycles Snapshots does not allocate for queues that fit.
func Dump(fd int, s *Snapshot) error {
	if err := Inspect(fd, s); err != nil {
		return err
	}
	return Capture(fd, s)
}

// Inspect is the part of a dump that may run before the connection is
// locked: it refuses connections that cannot be migrated (returning an
// *UnsupportedError and changing nothing), and reads the addresses, the
// shutdown bits and the ordinary socket options into s. The owner of the
// socket must already be frozen, so that the options do not change.
//
// Inspect looks the connection up with NETLINK_SOCK_DIAG (to see TCP-MD5
// keys and the shutdown bits), so it must run in the socket's network
// namespace.
func Inspect(fd int, s *Snapshot) error {
	return inspect(fd, s, func(fd int, s *Snapshot) (diagInfo, error) {
		return sockDiag(fd, s.Family, s.Local, s.Remote)
	})
}

// inspect is Inspect with the sock_diag lookup of s's connection given:
// one request per socket (Inspect) or one dump for many (Inspector).
func inspect(fd int, s *Snapshot, diagOf func(fd int, s *Snapshot) (diagInfo, error)) error {
	recvQ, sendQ := s.RecvQueue[:0], s.SendQueue[:0]
	*s = Snapshot{RecvQueue: recvQ, SendQueue: sendQ}

	domain, err := getInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return &OpError{Op: "getsockopt SO_DOMAIN", Err: err}
	}
	if domain != unix.AF_INET && domain != unix.AF_INET6 {
		return &UnsupportedError{Reason: ReasonFamily, Detail: "domain " + itoa(int(domain))}
	}
	s.Family = uint16(domain)
	proto, err := getInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return &OpError{Op: "getsockopt SO_PROTOCOL", Err: err}
	}
	switch proto {
	case unix.IPPROTO_TCP:
	case unix.IPPROTO_MPTCP:
		return &UnsupportedError{Reason: ReasonMPTCP}
	default:
		return &UnsupportedError{Reason: ReasonNotTCP, Detail: "protocol " + itoa(int(proto))}
	}
	var info tcpInfoHead
	if err := getInfo(fd, &info); err != nil {
		return &OpError{Op: "getsockopt TCP_INFO", Err: err}
	}
	st := State(info.State)
	s.State = st // as inspected; Capture reads it again under the lock
	if !st.Migratable() {
		local, _ := sockname(fd, false)
		remote, _ := peername(fd, s.Family)
		return &UnsupportedError{Local: local, Remote: remote, Reason: ReasonState, Detail: st.String()}
	}
	if s.Local, err = sockname(fd, false); err != nil {
		return &OpError{Op: "getsockname", Err: err}
	}
	if s.Remote, err = peername(fd, s.Family); errors.Is(err, unix.ENOTCONN) {
		// A CLOSE socket that was never connected has no peer.
		return &UnsupportedError{Local: s.Local, Reason: ReasonState, Detail: st.String() + ", not connected"}
	} else if err != nil {
		return &OpError{Op: "getpeername", Local: s.Local, Err: err}
	}
	refuse := func(r Reason, detail string) error {
		return &UnsupportedError{Local: s.Local, Remote: s.Remote, Reason: r, Detail: detail}
	}
	if v, err := getInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR); err != nil {
		return s.opErr("getsockopt TCP_REPAIR", err)
	} else if v != 0 {
		return refuse(ReasonRepairOn, "")
	}
	var name [16]byte
	if n, err := getsockopt(fd, unix.IPPROTO_TCP, unix.TCP_ULP, unsafe.Pointer(&name), 16); err != nil {
		return s.opErr("getsockopt TCP_ULP", err)
	} else if ulp := cstring(name[:n]); len(ulp) > 0 {
		return refuse(ReasonULP, string(ulp))
	}
	var ao [64]byte
	if _, err := getsockopt(fd, unix.IPPROTO_TCP, tcpAOInfo, unsafe.Pointer(&ao), uint32(len(ao))); err == nil {
		return refuse(ReasonAO, "")
	} else if !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENOPROTOOPT) {
		return s.opErr("getsockopt TCP_AO_INFO", err)
	}
	if v, err := ioctlInt(fd, unix.SIOCATMARK); err != nil {
		return s.opErr("ioctl SIOCATMARK", err)
	} else if v != 0 {
		return refuse(ReasonUrgent, "")
	}
	if st == StateClose {
		// A closed socket is out of the lookup tables, so sock_diag cannot
		// find it; it sends nothing any more, so MD5 keys do not matter,
		// and the kernel shut both directions when it closed.
		s.Shutdown = ShutRead | ShutWrite
	} else {
		diag, err := diagOf(fd, s)
		if err != nil {
			return s.opErr("sock_diag lookup (is the socket in this network namespace?)", err)
		}
		if diag.md5 {
			return refuse(ReasonMD5, "")
		}
		s.Shutdown = diag.shutdown
	}
	if op, err := readOptions(fd, s.Family, &s.Options); err != nil {
		return s.opErr(op, err)
	}
	return nil
}

// Capture completes a Snapshot that Inspect began: repair on, then the
// state, negotiated options, sequence numbers, window, timestamp and both
// queues (REPAIR-NOTES 3.2, steps D4 to D14). The connection must be locked.
//
// If the counters change between the first read and the re-read at the end
// (traffic leaked past the lock), Capture retries a few times and then
// fails with ErrUnstable. On success the socket stays in repair mode with no
// queue selected; on error it is taken back out of repair mode.
//
// For an ESTABLISHED connection with timestamps Capture makes 13 system
// calls when idle and 16 with data in flight and in both queues, repair on
// included (docs/repair.md, "What Capture reads"); SO_PEEK_OFF set by the
// owner costs one more.
func Capture(fd int, s *Snapshot) error {
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		return s.opErr("turn repair on", err)
	}
	return Recapture(fd, s)
}

// Recapture is Capture of a socket already in repair mode with no queue
// selected, as Unchanged leaves a pre-copied connection that moved: it
// spares the freeze a second repair-on. Its errors are Capture's.
func Recapture(fd int, s *Snapshot) (err error) {
	defer func() {
		if err != nil {
			_ = resume(fd, s, unix.TCP_REPAIR_OFF)
		}
	}()
	if s.Options.Mask&OptPeekOff != 0 {
		if err := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, -1); err != nil {
			return s.opErr("clear SO_PEEK_OFF", err)
		}
	}
	return captureRetry(fd, s, nil)
}

// captureRetry runs capture until it is stable, at most maxCaptureAttempts
// times, with repair mode already on; last, if not nil, gets the closing
// TCP_INFO read of the attempt that succeeded.
func captureRetry(fd int, s *Snapshot, last *tcpInfoHead) (err error) {
	var ti tcpInfoHead
	if last == nil {
		last = &ti
	}
	for attempt := 1; ; attempt++ {
		err = capture(fd, s, last)
		if !errors.Is(err, ErrUnstable) || attempt == maxCaptureAttempts {
			return err
		}
	}
}

// testHook, when set by a test, runs at three steps of capture: "start",
// at the beginning of each attempt, "peek", before the send queue is
// peeked, and "recheck", before the closing TCP_INFO read. A segment the
// test lets through at the last two has got past the lock during the
// capture.
var testHook func(step string, fd int, s *Snapshot)

// capture is one attempt of Capture, everything but repair on: 12 of its
// 13 system calls for an idle ESTABLISHED connection, 15 of 16 with data in
// flight and in both queues.
func capture(fd int, s *Snapshot, last *tcpInfoHead) error {
	if h := testHook; h != nil {
		h("start", fd, s)
	}
	var first tcpInfoHead
	if err := getInfoRaw(fd, &first); err != nil {
		return s.opErr("getsockopt TCP_INFO", err)
	}
	// A peek that does not match its queue's length is hidden bytes (CRIU
	// #622) only if the socket stood still; a segment that got past the
	// lock between the ioctl and the peek makes it a retry.
	// The peek has a queue selected: before Capture retries, the
	// selection goes, or tcp_write_xmit's repair path could mark the send
	// queue's never-sent data sent without transmitting it while the next
	// attempt starts.
	peekErr := func(op string, err error) error {
		var now tcpInfoHead
		if errors.Is(err, ErrQueueMismatch) && getInfoRaw(fd, &now) == nil {
			if what := whatMoved(&first, &now); what != "" {
				if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue); err != nil {
					return s.opErr("deselect queue", err)
				}
				return s.opErr(op+" ("+what+" moved)", ErrUnstable)
			}
		}
		return s.opErr(op, err)
	}
	s.State = State(first.State)
	if !s.State.Migratable() {
		return &UnsupportedError{Local: s.Local, Remote: s.Remote, Reason: ReasonState, Detail: s.State.String()}
	}
	if s.State == StateSynSent {
		return captureSynSent(fd, s)
	}
	// The peer's FIN or reset may have arrived since Inspect read the
	// shutdown bits (the owner, frozen, cannot have changed them).
	switch {
	case s.State == StateClose:
		s.Shutdown = ShutRead | ShutWrite
	case s.State.peerFin():
		s.Shutdown |= ShutRead
	}
	opts := first.Options
	s.Flags = FlagWindow
	if opts&tcpiOptSACK != 0 {
		s.Flags |= FlagSACK
	}
	if opts&tcpiOptECN != 0 {
		s.Flags |= FlagECN
	}
	s.SndWScale, s.RcvWScale = 0, 0
	if opts&tcpiOptWScale != 0 {
		s.Flags |= FlagWScale
		s.SndWScale, s.RcvWScale = first.WScale&0xf, first.WScale>>4
	}

	outq, unsq, inq, op, err := captureLengths(fd, s.State, &first)
	if err != nil {
		return s.opErr(op, err)
	}
	mss, err := getIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_MAXSEG)
	if err != nil {
		return s.opErr("getsockopt TCP_MAXSEG", err)
	}
	s.MSSClamp = uint32(mss)
	s.Timestamp = 0
	if opts&tcpiOptTimestamps != 0 {
		s.Flags |= FlagTimestamps
		if err := readTimestamp(fd, s, opts&tcpiOptUsecTS != 0); err != nil {
			return s.opErr("getsockopt TCP_TIMESTAMP", err)
		}
	}
	if err := getWindow(fd, &s.Window); err != nil {
		if errors.Is(err, unix.ENOPROTOOPT) {
			return s.opErr("getsockopt TCP_REPAIR_WINDOW", ErrNoRepairWindow)
		}
		return s.opErr("getsockopt TCP_REPAIR_WINDOW", err)
	}

	if s.RecvSeq, op, err = queueSeq(fd, tcpRecvQueue); err != nil {
		return s.opErr(op, err)
	}
	// In CLOSE an empty peek would consume the pending error (ECONNRESET)
	// of a reset connection; the length alone says the queue is empty.
	// Elsewhere the empty peek stays: SIOCINQ counts only up to an urgent
	// mark (tcp_inq), and urgent data that arrived after Inspect's
	// SIOCATMARK, before the lock, would hide the bytes behind it.
	if inq > 0 || s.State != StateClose {
		if s.RecvQueue, err = peekQueue(fd, s.RecvQueue, int(inq)); err != nil {
			return peekErr("peek receive queue", err)
		}
	} else {
		s.RecvQueue = s.RecvQueue[:0]
	}
	if s.SendSeq, op, err = queueSeq(fd, tcpSendQueue); err != nil {
		return s.opErr(op, err)
	}
	// A queued FIN takes a sequence number but no byte; a CLOSE socket's
	// send data is dropped (REPAIR-NOTES 3.4).
	dataOut, dataUnsent := queueLengthsFor(s.State, outq, unsq)
	if s.State.ourFin() && s.State != StateFinWait2 && s.State != StateClose && unsq > 0 {
		s.Flags |= FlagFINUnsent // the FIN is the last thing of the write queue
	}
	switch {
	case s.State == StateClose, outq == 0:
		// No peek of an empty send queue: with write_seq = snd_una (and so
		// = snd_nxt) no skb holds a byte, as tcp_clean_rtx_queue has freed
		// every acknowledged skb of the retransmission queue and the write
		// queue holds nothing from snd_nxt on. Bytes hide only in a queue
		// of length 1 or more: a partly acknowledged skb (CRIU #622), or
		// a FIN skb whose data the peer acknowledged but not the FIN.
		s.SendQueue = s.SendQueue[:0]
	default:
		if h := testHook; h != nil {
			h("peek", fd, s)
		}
		if s.SendQueue, err = peekQueue(fd, s.SendQueue, int(dataOut)); err != nil {
			return peekErr("peek send queue", err)
		}
	}
	s.Unsent = uint32(dataUnsent)
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue); err != nil {
		return s.opErr("deselect queue", err)
	}

	// D14: anything that reached or changed the socket since the first
	// TCP_INFO shows in a second one (whatMoved); a reader that got round
	// repair mode shows only in SIOCINQ, and only where there was data.
	if h := testHook; h != nil {
		h("recheck", fd, s)
	}
	if err := getInfoRaw(fd, last); err != nil {
		return s.opErr("getsockopt TCP_INFO", err)
	}
	if what := whatMoved(&first, last); what != "" {
		return s.opErr("re-read TCP_INFO ("+what+" moved)", ErrUnstable)
	}
	if inq > 0 {
		if inq2, err := ioctlIntRaw(fd, unix.SIOCINQ); err != nil {
			return s.opErr("ioctl SIOCINQ", err)
		} else if inq2 != inq {
			return s.opErr("re-read SIOCINQ", ErrUnstable)
		}
	}
	return nil
}

// captureSynSent is capture for a connection whose SYN is not answered
// yet: all it has is its initial sequence number (write_seq is one past
// it) and its timestamp clock, which the SYN carried and a peer that saw
// it remembers. Nothing was negotiated, and no window or queue exists; a
// send queue holding data (a Fast Open SYN) fails the peek rather than
// lose it.
func captureSynSent(fd int, s *Snapshot) error {
	s.Flags, s.SndWScale, s.RcvWScale, s.Timestamp = 0, 0, 0, 0
	s.Window, s.RecvSeq, s.Unsent = Window{}, 0, 0
	s.RecvQueue = s.RecvQueue[:0]
	mss, err := getIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_MAXSEG)
	if err != nil {
		return s.opErr("getsockopt TCP_MAXSEG", err)
	}
	s.MSSClamp = uint32(mss)
	if err := readTimestamp(fd, s, false); err != nil {
		return s.opErr("getsockopt TCP_TIMESTAMP", err)
	}
	var op string
	if s.SendSeq, op, err = queueSeq(fd, tcpSendQueue); err != nil {
		return s.opErr(op, err)
	}
	if s.SendQueue, err = peekQueue(fd, s.SendQueue, 0); err != nil {
		return s.opErr("peek send queue (data in the SYN?)", err)
	}
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue); err != nil {
		return s.opErr("deselect queue", err)
	}
	// D14: a SYN-ACK that got past the lock would have moved the state.
	if st, err := readState(fd); err != nil {
		return s.opErr("getsockopt TCP_INFO", err)
	} else if st != StateSynSent {
		return s.opErr("re-read state", ErrUnstable)
	}
	return nil
}

// queueSeq selects queue (tcpRecvQueue or tcpSendQueue) of fd, in repair
// mode, and reads its TCP_QUEUE_SEQ: rcv_nxt or write_seq. The queue stays
// selected for the peek that follows; on error queueSeq names the failed
// operation.
func queueSeq(fd int, queue int32) (seq uint32, op string, err error) {
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, queue); err != nil {
		return 0, "select " + queueName(queue) + " queue", err
	}
	v, err := getIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ)
	if err != nil {
		return 0, "getsockopt TCP_QUEUE_SEQ (" + queueName(queue) + ")", err
	}
	return uint32(v), "", nil
}

func queueName(queue int32) string {
	if queue == tcpSendQueue {
		return "send"
	}
	return "receive"
}

// readTimestamp reads the timestamp clock (TCP_TIMESTAMP) into
// s.Timestamp, even, with FlagUsecTS set in s.Flags when the clock counts
// microseconds: bit 0 of the value (Linux 6.7+), or usecOpt (the
// connection negotiated it, TCPI_OPT_USEC_TS). Before 6.7 an odd value is
// rounded up, never down (REPAIR-NOTES 4.5).
func readTimestamp(fd int, s *Snapshot, usecOpt bool) error {
	ts, err := getIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP)
	if err != nil {
		return err
	}
	s.Timestamp = uint32(ts)
	if kernelUsecTS() {
		if s.Timestamp&1 != 0 || usecOpt {
			s.Flags |= FlagUsecTS
		}
		s.Timestamp &^= 1
	} else if s.Timestamp&1 != 0 {
		s.Timestamp++ // never step back
	}
	return nil
}

// captureLengths returns the raw lengths of the send queue (write_seq -
// snd_una, SIOCOUTQ), of its never-sent part (write_seq - snd_nxt,
// SIOCOUTQNSD) and of the receive queue (SIOCINQ) of a socket in state st
// whose TCP_INFO is ti; on error it names the failed operation.
//
// The never-sent length is tcpi_notsent_bytes, the same difference as
// SIOCOUTQNSD outside SYN_SENT (tcp_get_info, tcp_ioctl). With nothing in
// flight (tcpi_unacked, packets_out, is 0) the retransmission queue is
// empty, so snd_una = snd_nxt and SIOCOUTQ equals it too; in CLOSE the
// send queue is dropped whatever its length (queueLengthsFor), and
// tcp_write_queue_purge may have emptied it while leaving snd_una behind.
// SIOCOUTQ is read only for data in flight. SIOCINQ (rcv_nxt -
// copied_seq, less the FIN, up to an urgent mark: tcp_inq) has no
// counterpart in TCP_INFO.
func captureLengths(fd int, st State, ti *tcpInfoHead) (outq, unsq, inq int32, op string, err error) {
	unsq = int32(ti.NotsentBytes)
	outq = unsq
	if ti.Unacked != 0 && st != StateClose {
		if outq, err = ioctlIntRaw(fd, unix.SIOCOUTQ); err != nil {
			return 0, 0, 0, "ioctl SIOCOUTQ", err
		}
	}
	if inq, err = ioctlIntRaw(fd, unix.SIOCINQ); err != nil {
		return 0, 0, 0, "ioctl SIOCINQ", err
	}
	if outq < 0 || unsq < 0 || inq < 0 || unsq > outq {
		return 0, 0, 0, "queue lengths", ErrQueueMismatch
	}
	return outq, unsq, inq, "", nil
}

// peekQueue peeks want+1 bytes of the selected queue into buf (grown if
// needed) and insists on getting exactly want: one more byte proves there
// is no hidden data (CRIU issue #622).
func peekQueue(fd int, buf []byte, want int) ([]byte, error) {
	if cap(buf) < want+1 {
		buf = make([]byte, want+1)
	}
	if want == 0 {
		var one [1]byte
		n, err := peek(fd, one[:])
		if err != nil {
			return buf[:0], err
		}
		if n != 0 {
			return buf[:0], ErrQueueMismatch
		}
		return buf[:0], nil
	}
	buf = buf[:want+1]
	n, err := peek(fd, buf)
	if err != nil {
		if errors.Is(err, unix.EFAULT) {
			return buf[:0], ErrQueueMismatch // more data than the buffer: hidden bytes
		}
		return buf[:0], err
	}
	if n != want {
		return buf[:0], ErrQueueMismatch
	}
	return buf[:want], nil
}

// kernelUsecTS reports whether TCP_TIMESTAMP carries the microsecond flag in
// bit 0 (Linux 6.7+). There is no runtime probe for it (REPAIR-NOTES 8.1).
var kernelUsecTS = sync.OnceValue(func() bool { return kernelAtLeast(6, 7) })

func kernelAtLeast(major, minor int) bool {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return false
	}
	maj, min := parseRelease(unix.ByteSliceToString(u.Release[:]))
	return maj > major || maj == major && min >= minor
}

func parseRelease(r string) (major, minor int) {
	n, part := 0, 0
	for i := 0; i < len(r); i++ {
		c := r[i]
		if c >= '0' && c <= '9' {
			n = n*10 + int(c-'0')
			continue
		}
		if part == 0 {
			major, n, part = n, 0, 1
			if c == '.' {
				continue
			}
		}
		break
	}
	if part == 0 {
		return n, 0
	}
	return major, n
}
