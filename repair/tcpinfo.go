package repair

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// tcpInfoHead mirrors the first 152 bytes of struct tcp_info
// (include/uapi/linux/tcp.h), everything up to tcpi_min_rtt, which every
// kernel since 4.6 fills; every read of TCP_INFO in this package fills
// one (do_tcp_getsockopt fills the whole struct with tcp_get_info whatever
// the length asked for, so a read of the state alone costs the same).
// Capture reads it twice: the first read gives the state, the negotiated
// options and the lengths of the send queue (captureLengths); the second,
// compared with the first, proves that nothing reached or changed the
// socket in between (whatMoved).
// TestTCPInfoLayout pins the offsets against golang.org/x/sys/unix.TCPInfo.
type tcpInfoHead struct {
	State, CAState, Retransmits, Probes, Backoff, Options uint8
	WScale                                                uint8 // snd_wscale in the low nibble, rcv_wscale in the high one
	Flags                                                 uint8 // delivery_rate_app_limited, fastopen_client_fail

	RTO, ATO, SndMSS, RcvMSS                             uint32
	Unacked, Sacked, Lost, Retrans, Fackets              uint32 // Unacked is packets_out: segments sent and not yet acknowledged
	LastDataSent, LastAckSent, LastDataRecv, LastAckRecv uint32
	PMTU, RcvSsthresh, RTT, RTTVar, SndSsthresh          uint32
	SndCwnd, AdvMSS, Reordering, RcvRTT, RcvSpace        uint32
	TotalRetrans                                         uint32

	PacingRate, MaxPacingRate uint64
	BytesAcked                uint64 // advanced by every move of snd_una (tcp_snd_una_update)
	BytesReceived             uint64 // advanced by every move of rcv_nxt (tcp_rcv_nxt_update), a FIN included

	SegsOut      uint32
	SegsIn       uint32 // every segment that reached the socket, counted on arrival (tcp_segs_in)
	NotsentBytes uint32 // write_seq - snd_nxt (0 if negative): SIOCOUTQNSD
	MinRTT       uint32
}

const tcpInfoSize = uint32(unsafe.Sizeof(tcpInfoHead{}))

// getInfoRaw reads TCP_INFO into ti with a raw call, on a socket no other
// task holds (sys.go); getInfo reads it through the scheduler. They are the
// package's only readers of TCP_INFO. A kernel that fills less than
// tcpInfoHead (before 4.6) is older than TCP_REPAIR_WINDOW too, and is
// refused as such.
func getInfoRaw(fd int, ti *tcpInfoHead) error {
	return infoRead(getsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(ti), tcpInfoSize))
}

func getInfo(fd int, ti *tcpInfoHead) error {
	return infoRead(getsockopt(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(ti), tcpInfoSize))
}

func infoRead(n uint32, err error) error {
	if err != nil {
		return err
	}
	if n < tcpInfoSize {
		return ErrNoRepairWindow
	}
	return nil
}

// readState reads the TCP state of a socket no other task holds.
func readState(fd int) (State, error) {
	var ti tcpInfoHead
	err := getInfoRaw(fd, &ti)
	return State(ti.State), err
}

// whatMoved compares the TCP_INFO read at the start of a capture (a) with the
// one read at its end (b) and names the first field that differs, or
// returns "" when they agree: then the counters Capture read in between
// (rcv_nxt, write_seq, snd_una, snd_nxt, the queue lengths and the queues
// themselves) describe one state of the socket (REPAIR-NOTES 3.2, D14).
//
// Why these fields are enough, from the kernel's code (Linux 6.x):
//
//   - Every segment of the connection reaches the socket through
//     tcp_v4_rcv or tcp_v6_rcv, which call tcp_segs_in under the socket's
//     spinlock before processing the segment or adding it to the backlog
//     of a socket owned by a syscall. A segment that got past the lock
//     after the first read's snapshot of segs_in therefore changes SegsIn.
//   - tcp_get_info reads the state before it locks the socket and the
//     rest under lock_sock_fast; a segment counted before that read but
//     waiting in the backlog is processed at its unlock, after the first
//     read. What it changes of the values taken from the first read shows
//     in the second: the state (a FIN, a reset), BytesReceived (rcv_nxt:
//     data or FIN), BytesAcked (snd_una), NotsentBytes and Unacked. Every
//     other value Capture keeps is read after the first TCP_INFO.
//   - Without a segment, snd_nxt moves only in tcp_event_new_data_sent:
//     after a transmission that succeeded (the lock's output drop makes
//     __tcp_transmit_skb fail with EPERM, so tcp_write_xmit stops without
//     it), or on tcp_write_xmit's repair path, which marks never-sent data
//     as sent while the send queue is selected (a pacing, TSQ or loss
//     probe timer can run it). That path adds to packets_out (Unacked)
//     and lowers NotsentBytes. write_seq moves only by a send, which in
//     repair mode appends to the selected queue (Unacked or NotsentBytes
//     of the send queue, BytesReceived of the receive queue:
//     tcp_send_rcvq) or fails with no queue selected, or by our FIN (a
//     state change).
//   - Timers without a segment can change Unacked, and so cost a spurious
//     retry. A retransmission (the RTO timer, a loss probe) goes through
//     __tcp_retransmit_skb, which before transmitting may split the skb
//     (tcp_fragment), re-count its segments for the current MSS, or merge
//     the skbs after it into it (tcp_retrans_try_collapse); each adjusts
//     packets_out (tcp_adjust_pcount) while no byte and no sequence number
//     moves. The transmission then fails under the lock. Trimming bytes
//     already acknowledged off the head skb (tcp_trim_head) can only make
//     the send-queue peek agree with SIOCOUTQ. Probes, keepalives and
//     delayed ACKs fail in output likewise; a timeout that gives up on the
//     connection changes the state.
//   - ICMP errors reach the socket without a segment of the connection and
//     without counting segs_in: tcp_v4_err and tcp_v6_err handle them
//     under the socket's spinlock, and the lock, which matches the
//     connection's TCP segments, lets them in. None of them moves rcv_nxt,
//     snd_una, snd_nxt, write_seq or a byte of the queues. What they do:
//     end a SYN_SENT or SYN_RECV connection (tcp_done: the state); on
//     "fragmentation needed" or "packet too big", at once or at the next
//     release_sock (TCP_MTU_REDUCED_DEFERRED), lower mss_cache
//     (tcp_sync_mss; Capture reads mss_clamp, which it leaves alone) and
//     retransmit (tcp_simple_retransmit: Unacked, as above); on "net" or
//     "host unreachable" undo one RTO backoff (tcp_ld_RTO_revert), which
//     may run the retransmission timer at once (a retransmission or a
//     timeout, as above); redirect the route; set sk_err or sk_err_soft,
//     which no Snapshot carries, whenever they were set. So an ICMP error
//     during a capture changes a compared field or nothing the Snapshot
//     keeps.
//   - SegsOut and the byte counters of transmissions are deliberately not
//     compared: counting a transmission attempt would turn every firing
//     timer into a retry. Of what the Snapshot keeps, an attempt changes
//     only the receive window: __tcp_transmit_skb computes the advertised
//     window (tcp_select_window: rcv_wup set to rcv_nxt, the right edge
//     not lowered unless net.ipv4.tcp_shrink_window is on) before the
//     output hook drops the segment. Whether
//     TCP_REPAIR_WINDOW read it before or after, the peer knows a right
//     edge no higher than the one captured, and the restored socket only
//     keeps from shrinking below it.
//
// What this cannot see is copied_seq (no field of tcp_info holds it): it
// moves only when something reads the socket, which the frozen owner
// cannot do and repair mode refuses to recvmsg without MSG_PEEK, but
// splice and TCP_ZEROCOPY_RECEIVE do not check repair mode. Capture
// therefore reads SIOCINQ again when the receive queue held data (with an
// empty queue nothing can be read until a segment arrives).
func whatMoved(a, b *tcpInfoHead) string {
	switch {
	case a.State != b.State:
		return "state"
	case a.SegsIn != b.SegsIn:
		return "segments in"
	case a.BytesReceived != b.BytesReceived:
		return "bytes received"
	case a.BytesAcked != b.BytesAcked:
		return "bytes acknowledged"
	case a.NotsentBytes != b.NotsentBytes:
		return "never-sent bytes"
	case a.Unacked != b.Unacked:
		return "segments in flight"
	}
	return ""
}
