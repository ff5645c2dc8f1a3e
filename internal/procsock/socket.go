package procsock

import (
	"net/netip"
	"slices"
	"strconv"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// Socket is one TCP socket of a process, as List found it. It is plain data:
// nothing in it keeps the socket or the process alive.
type Socket struct {
	// PID is the process List was asked about.
	PID int
	// FDs are the process's descriptors that refer to the socket, in
	// ascending order. A socket shared by several descriptors (dup, or
	// inherited twice) is listed once with all of them. FDs is empty for a
	// connection that stays behind (Verdict.Reason is ReasonNoDescriptor).
	FDs []int
	// Inode is the socket's inode number, as in /proc/PID/fd's
	// "socket:[INODE]"; zero when there is no descriptor.
	Inode uint64
	// Cookie is the kernel's socket cookie (SO_COOKIE), which names the
	// socket for its whole life within its network namespace.
	Cookie uint64
	// Family is unix.AF_INET or unix.AF_INET6.
	Family uint16
	// Local and Remote are the socket's addresses. A listener's Remote is
	// the unspecified address with port 0 (0.0.0.0:0 or [::]:0). An IPv6
	// socket that talks IPv4 shows IPv4-mapped addresses.
	Local, Remote netip.AddrPort
	// State is the TCP state, numbered as the kernel (and repair) number them.
	State repair.State
	// RecvQ and SendQ are the bytes in the receive and send queues; for a
	// listener, RecvQ is the accept queue length and SendQ its backlog.
	RecvQ, SendQ uint32
	// Verdict says whether send --pid would take the socket, and why not.
	Verdict Verdict
}

// FD returns the socket's lowest descriptor number in the process, or -1
// when it has none.
func (s *Socket) FD() int {
	if len(s.FDs) == 0 {
		return -1
	}
	return s.FDs[0]
}

// Reason is a stable code saying why send --pid leaves a socket alone.
type Reason uint8

// The reasons a socket is not taken. The zero Reason goes with a taken
// socket.
const (
	// ReasonListener: a listening socket. It is not migrated as a
	// connection: send --pid recreates it on the target (Listeners) and
	// takes its accept queue.
	ReasonListener Reason = iota + 1
	// ReasonState: a TCP state this version does not migrate (half-closed,
	// or not yet established, or closed).
	ReasonState
	// ReasonFiltered: an established connection whose local port is not
	// among the ports asked for.
	ReasonFiltered
	// ReasonNoDescriptor: a connection on one of the process's local ports
	// that no descriptor refers to (TIME_WAIT, orphaned after close, or not
	// yet accepted). It stays behind by design.
	ReasonNoDescriptor
	// ReasonRepair: repair.Inspect refused the connection (kTLS, TCP-MD5,
	// TCP-AO, urgent data, already in repair mode...).
	ReasonRepair
)

var reasonNames = [...]string{
	ReasonListener:     "listener",
	ReasonState:        "state",
	ReasonFiltered:     "filtered",
	ReasonNoDescriptor: "no-descriptor",
	ReasonRepair:       "repair",
}

// String returns the reason's stable short name, as used in reports.
func (r Reason) String() string {
	if int(r) < len(reasonNames) && reasonNames[r] != "" {
		return reasonNames[r]
	}
	return "reason(" + strconv.Itoa(int(r)) + ")"
}

// Verdict says whether send --pid would take a socket and, if not, why.
type Verdict struct {
	// Take is true when send --pid would migrate the socket.
	Take bool
	// Reason is the stable code of the refusal; zero when Take is true.
	Reason Reason
	// Text explains the verdict to a person, such as "take", "listener
	// (recreated on the target)" or "state SYN_RECV: not established
	// yet". Programs use Take and Reason, never Text.
	Text string
}

// String returns v.Text.
func (v Verdict) String() string { return v.Text }

var take = Verdict{Take: true, Text: "take"}

// verdictFor is the verdict of List for a socket the process holds a
// descriptor for, before any port filter.
func verdictFor(st repair.State) Verdict {
	switch st {
	case repair.StateEstablished, repair.StateSynSent, repair.StateFinWait1, repair.StateFinWait2,
		repair.StateCloseWait, repair.StateLastAck, repair.StateClosing:
		return take
	case repair.StateListen:
		return Verdict{Reason: ReasonListener, Text: "listener (recreated on the target)"}
	case repair.StateSynRecv:
		return Verdict{Reason: ReasonState, Text: "state " + st.String() + ": not established yet"}
	case repair.StateClose:
		return Verdict{Reason: ReasonState, Text: "state CLOSE: not connected"}
	default:
		return Verdict{Reason: ReasonState, Text: "state " + st.String()}
	}
}

// verdictBehind is the verdict of a connection without a descriptor.
func verdictBehind(st repair.State) Verdict {
	text := "stays behind: no descriptor"
	switch st {
	case repair.StateEstablished, repair.StateSynRecv:
		text = "no descriptor (not yet accepted): taken from its listener by send --pid"
	case repair.StateNewSynRecv:
		text += " (handshake in progress: send --pid waits for it before taking the listener's queue)"
	case repair.StateTimeWait:
		text += " (TIME_WAIT)"
	default:
		text += " (orphaned in " + st.String() + ")"
	}
	return Verdict{Reason: ReasonNoDescriptor, Text: text}
}

// Filter applies send --pid's --port selection to sockets returned by List:
// an established connection whose local port is not in ports gets the
// verdict "port filtered out"; every other verdict is kept, since such a
// socket would not be taken whatever the ports. Empty ports select every
// established connection, so socks come back unchanged.
//
// Filter returns a copy of socks (the FDs slices are shared) and the ports
// that select no socket that is still taken, in the order given, so that a
// caller can reject "--port 8080" when nothing is taken on it.
func Filter(socks []Socket, ports []uint16) (selected []Socket, unused []uint16) {
	out := slices.Clone(socks)
	if len(ports) == 0 {
		return out, nil
	}
	used := make(map[uint16]bool, len(ports))
	for i := range out {
		s := &out[i]
		if !s.Verdict.Take {
			continue
		}
		if p := s.Local.Port(); slices.Contains(ports, p) {
			used[p] = true
			continue
		}
		s.Verdict = Verdict{Reason: ReasonFiltered, Text: "port filtered out"}
	}
	for _, p := range ports {
		if !used[p] && !slices.Contains(unused, p) {
			unused = append(unused, p)
		}
	}
	return out, unused
}

// Taken returns the sockets whose verdict is Take, in order.
func Taken(socks []Socket) []Socket {
	var out []Socket
	for _, s := range socks {
		if s.Verdict.Take {
			out = append(out, s)
		}
	}
	return out
}
