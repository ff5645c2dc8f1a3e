package repair

import (
	"net/netip"
	"time"
)

// State is a TCP state, numbered as the kernel numbers them (include/net/tcp_states.h).
type State uint8

// The TCP states.
const (
	StateEstablished State = 1
	StateSynSent     State = 2
	StateSynRecv     State = 3
	StateFinWait1    State = 4
	StateFinWait2    State = 5
	StateTimeWait    State = 6
	StateClose       State = 7
	StateCloseWait   State = 8
	StateLastAck     State = 9
	StateListen      State = 10
	StateClosing     State = 11
	StateNewSynRecv  State = 12
)

var stateNames = [...]string{
	StateEstablished: "ESTABLISHED",
	StateSynSent:     "SYN_SENT",
	StateSynRecv:     "SYN_RECV",
	StateFinWait1:    "FIN_WAIT1",
	StateFinWait2:    "FIN_WAIT2",
	StateTimeWait:    "TIME_WAIT",
	StateClose:       "CLOSE",
	StateCloseWait:   "CLOSE_WAIT",
	StateLastAck:     "LAST_ACK",
	StateListen:      "LISTEN",
	StateClosing:     "CLOSING",
	StateNewSynRecv:  "NEW_SYN_RECV",
}

// String returns the kernel's name of the state, such as "ESTABLISHED".
func (s State) String() string {
	if int(s) < len(stateNames) && stateNames[s] != "" {
		return stateNames[s]
	}
	return "STATE(" + itoa(int(s)) + ")"
}

// Flags say which negotiated TCP options a connection uses and which optional
// parts of a Snapshot are present.
type Flags uint32

// The flags of a Snapshot.
const (
	// FlagSACK: selective acknowledgements were negotiated.
	FlagSACK Flags = 1 << iota
	// FlagWScale: window scaling was negotiated; SndWScale and RcvWScale are valid.
	FlagWScale
	// FlagTimestamps: TCP timestamps were negotiated; Timestamp is valid.
	FlagTimestamps
	// FlagUsecTS: the connection uses microsecond timestamps (kernel 6.7+).
	FlagUsecTS
	// FlagECN: ECN was negotiated. No repair call restores it; the restored
	// connection runs without ECN. Recorded for reporting only.
	FlagECN
	// FlagWindow: Window holds the five TCP_REPAIR_WINDOW fields.
	FlagWindow
	// FlagFINUnsent: our FIN is queued but was never transmitted (it waits
	// behind unsent data or a closed window). Only in FIN_WAIT1, CLOSING
	// and LAST_ACK; without it, the FIN of those states went out and only
	// its acknowledgement is missing.
	FlagFINUnsent
	// FlagHeld: the peer was held with a zero window before the dump
	// (MarkHeld): Window.RcvWnd is 0 and Window.RcvWup is RecvSeq, as the
	// peer believes, and the restored socket leaves repair with ResumeHeld
	// and is kicked (Kick) so that it announces its open window at once.
	FlagHeld
)

// knownFlags are the flags this version understands; Validate refuses others.
const knownFlags = FlagSACK | FlagWScale | FlagTimestamps | FlagUsecTS | FlagECN | FlagWindow | FlagFINUnsent | FlagHeld

// Shutdown records which directions of a socket the application shut down.
type Shutdown uint8

// The shutdown bits, as the kernel keeps them in sk_shutdown.
const (
	ShutRead  Shutdown = 1 // RCV_SHUTDOWN: shutdown(SHUT_RD) was called
	ShutWrite Shutdown = 2 // SEND_SHUTDOWN: shutdown(SHUT_WR) was called
)

// Window mirrors struct tcp_repair_window: the five window fields read and
// written with TCP_REPAIR_WINDOW. Its wire size is exactly 20 bytes.
type Window struct {
	SndWl1    uint32 // sequence number of the segment that last updated SndWnd
	SndWnd    uint32 // the peer's advertised window in bytes, already scaled
	MaxWindow uint32 // the largest window the peer ever offered
	RcvWnd    uint32 // the window we last advertised, in bytes
	RcvWup    uint32 // rcv_nxt at the time of that advertisement
}

// Snapshot is everything needed to rebuild one TCP connection on another
// host. It is plain data: Dump fills it, Restore reads it, and the transport
// encodes it. Sequence numbers are the kernel's raw 32-bit values.
//
// The send queue is one byte range: first the bytes the peer has not yet
// acknowledged (len(SendQueue) - Unsent of them), then Unsent bytes that were
// never transmitted. RecvSeq and SendSeq are the sequence numbers of the ends
// of the receive and send queues (rcv_nxt and write_seq); the starts follow
// from the queue lengths.
type Snapshot struct {
	// Local and Remote are the connection's addresses as the socket reports
	// them. A dual-stack socket talking IPv4 has IPv4-mapped IPv6 addresses
	// here and Family AF_INET6.
	Local, Remote netip.AddrPort
	// Family is the socket's address family: unix.AF_INET or unix.AF_INET6.
	Family uint16
	// State is the TCP state at the time of the dump.
	State State
	// Flags say which options were negotiated and which parts are present.
	Flags Flags
	// Shutdown holds the shutdown bits of the socket.
	Shutdown Shutdown

	// SndWScale and RcvWScale are the negotiated window scales (valid with FlagWScale).
	SndWScale, RcvWScale uint8
	// MSSClamp is the maximum segment size negotiated with the peer.
	MSSClamp uint32
	// Timestamp is the socket's TCP timestamp clock, offset included (valid
	// with FlagTimestamps). On 6.7+ kernels bit 0 is the microsecond flag,
	// which Dump moves into FlagUsecTS and clears here.
	Timestamp uint32

	// SendSeq is write_seq: the sequence number after the last queued byte.
	SendSeq uint32
	// RecvSeq is rcv_nxt: the next sequence number expected from the peer.
	RecvSeq uint32
	// Window holds the repair window (valid with FlagWindow).
	Window Window

	// RecvQueue holds the bytes received but not yet read by the application.
	RecvQueue []byte
	// SendQueue holds the bytes written but not yet acknowledged by the peer:
	// sent-unacknowledged bytes first, then Unsent never-sent bytes.
	SendQueue []byte
	// Unsent is how many bytes at the end of SendQueue were never transmitted.
	Unsent uint32

	// Options are the ordinary socket options carried across.
	Options Options
}

// SentUnacked returns the bytes of the send queue that were transmitted but
// not yet acknowledged by the peer.
func (s *Snapshot) SentUnacked() []byte { return s.SendQueue[:len(s.SendQueue)-int(s.Unsent)] }

// NeverSent returns the bytes of the send queue that were never transmitted.
func (s *Snapshot) NeverSent() []byte { return s.SendQueue[len(s.SendQueue)-int(s.Unsent):] }

// Tuple returns the connection's 4-tuple with IPv4-mapped addresses unmapped,
// as the firewall and crafted packets need them.
func (s *Snapshot) Tuple() (local, remote netip.AddrPort) {
	return unmap(s.Local), unmap(s.Remote)
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// OptMask says which optional members of Options were set on the source
// socket; Restore writes only those. Options that are always readable (such
// as the buffer sizes) have no bit.
type OptMask uint32

// The bits of OptMask.
const (
	OptLinger        OptMask = 1 << iota // SO_LINGER was enabled
	OptBindToDevice                      // SO_BINDTODEVICE was set
	OptBufLock                           // the kernel reported SO_BUF_LOCK (5.14+)
	OptCongestion                        // TCP_CONGESTION was read
	OptRTOMin                            // TCP_RTO_MIN_US was read (6.14+ kernels)
	OptRTOMax                            // TCP_RTO_MAX_MS was read (6.15+ kernels)
	OptTxDelay                           // TCP_TX_DELAY was set
	OptTransparent                       // IP_TRANSPARENT / IPV6_TRANSPARENT was set
	OptPeekOff                           // SO_PEEK_OFF was set (not -1)
	OptV6Only                            // IPV6_V6ONLY was set (AF_INET6 only)
	OptFreebind                          // IP_FREEBIND / IPV6_FREEBIND was set
	OptTClass                            // IPV6_TCLASS (AF_INET6 only) is valid
	OptUnicastHops                       // IPV6_UNICAST_HOPS (AF_INET6 only) is valid
	OptRecvErr                           // IP_RECVERR / IPV6_RECVERR was set
	OptMaxPacingRate                     // SO_MAX_PACING_RATE was set (not unlimited)
)

// Options holds the ordinary socket options that a migration carries: all
// that CRIU carries, plus TCP_USER_TIMEOUT, TCP_CONGESTION, TCP_NOTSENT_LOWAT,
// TCP_WINDOW_CLAMP, IPV6_TCLASS and more. Values are as getsockopt reports
// them, except where a field's comment says otherwise.
type Options struct {
	// Mask says which optional members below are valid.
	Mask OptMask

	// SndBuf and RcvBuf are the buffer sizes as getsockopt reports them
	// (twice the value a program asked for).
	SndBuf, RcvBuf int32
	// BufLock holds the SO_BUF_LOCK bits: 1 = send buffer fixed by the user,
	// 2 = receive buffer fixed. Autotuning is on where a bit is clear.
	BufLock uint8

	ReuseAddr, ReusePort bool
	KeepAlive            bool
	KeepIdle             int32 // TCP_KEEPIDLE, seconds
	KeepIntvl            int32 // TCP_KEEPINTVL, seconds
	KeepCnt              int32 // TCP_KEEPCNT
	NoDelay              bool
	Cork                 bool
	OOBInline            bool
	DontRoute            bool
	LingerSecs           int32 // SO_LINGER seconds (valid with OptLinger)
	Mark                 uint32
	Priority             int32
	RcvLowat             int32
	SndTimeo, RcvTimeo   time.Duration // SO_SNDTIMEO, SO_RCVTIMEO; 0 = none
	BindToDevice         string        // valid with OptBindToDevice
	PeekOff              int32         // valid with OptPeekOff

	UserTimeout   uint32 // TCP_USER_TIMEOUT, milliseconds
	Congestion    string // TCP_CONGESTION (valid with OptCongestion)
	NotSentLowat  uint32 // TCP_NOTSENT_LOWAT; 0 = the sysctl default
	WindowClamp   uint32 // TCP_WINDOW_CLAMP as read back
	Linger2       int32  // TCP_LINGER2, seconds
	RTOMinUs      uint32 // TCP_RTO_MIN_US (valid with OptRTOMin)
	RTOMaxMs      uint32 // TCP_RTO_MAX_MS (valid with OptRTOMax)
	TxDelayUs     uint32 // TCP_TX_DELAY (valid with OptTxDelay)
	MaxPacingRate uint64 // SO_MAX_PACING_RATE, bytes/s (valid with OptMaxPacingRate)

	TOS         uint8 // IP_TOS (IPv4 and IPv4-mapped)
	TTL         int32 // IP_TTL as read back
	TClass      int32 // IPV6_TCLASS (valid with OptTClass)
	UnicastHops int32 // IPV6_UNICAST_HOPS (valid with OptUnicastHops)
	MTUDiscover int32 // IP_MTU_DISCOVER or IPV6_MTU_DISCOVER
}
