package repair

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// maxWScale is TCP_MAX_WSCALE: the kernel refuses larger window scales.
const maxWScale = 14

// Validate checks that s describes a connection this version can rebuild
// and that its parts agree with each other (REPAIR-NOTES 3.7). It returns
// an error wrapping ErrInvalidSnapshot that names the first field at fault.
// Restore calls it before it creates anything.
func (s *Snapshot) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s %s: %s", ErrInvalidSnapshot, s.Local, s.Remote, fmt.Sprintf(format, args...))
	}
	switch s.Family {
	case unix.AF_INET:
		if !s.Local.Addr().Is4() || !s.Remote.Addr().Is4() {
			return bad("family AF_INET with non-IPv4 addresses")
		}
	case unix.AF_INET6:
		if !s.Local.Addr().Is6() || !s.Remote.Addr().Is6() {
			return bad("family AF_INET6 with non-IPv6 addresses")
		}
		if s.Local.Addr().Is4In6() != s.Remote.Addr().Is4In6() {
			return bad("one address IPv4-mapped and the other not")
		}
		if s.Local.Addr().Is4In6() && s.Options.Mask&OptV6Only != 0 {
			return bad("IPv4-mapped addresses on a v6-only socket")
		}
	default:
		return bad("unknown family %d", s.Family)
	}
	if s.Local.Port() == 0 || s.Remote.Port() == 0 {
		return bad("zero port")
	}
	if s.Local.Addr().IsUnspecified() || s.Remote.Addr().IsUnspecified() || s.Remote.Addr().IsMulticast() {
		return bad("unspecified or multicast address")
	}
	if !s.State.Migratable() {
		return bad("state %s is not supported", s.State)
	}
	if s.Flags&^knownFlags != 0 {
		return bad("unknown flags %#x", uint32(s.Flags&^knownFlags))
	}
	if s.State == StateSynSent {
		// Nothing is negotiated before the SYN-ACK: no options, window or
		// queue (Timestamp is the clock the SYN carried), and a shut write
		// side would have closed it.
		if s.Flags&^FlagUsecTS != 0 || s.SndWScale != 0 || s.RcvWScale != 0 || s.Window != (Window{}) {
			return bad("SYN_SENT with negotiated options or a window")
		}
		if s.Timestamp&1 != 0 {
			return bad("odd timestamp (bit 0 is the microsecond flag)")
		}
		if len(s.SendQueue) != 0 || len(s.RecvQueue) != 0 || s.Unsent != 0 {
			return bad("SYN_SENT with queued data")
		}
		if s.Shutdown&ShutWrite != 0 {
			return bad("SYN_SENT with the write side shut")
		}
		return s.validateOptions(bad)
	}
	if s.Flags&FlagWindow == 0 {
		return bad("no repair window")
	}
	if (s.State == StateClose || s.State == StateFinWait2) && len(s.SendQueue) != 0 {
		return bad("%s with %d bytes of send data", s.State, len(s.SendQueue))
	}
	if s.Flags&FlagFINUnsent != 0 && (!s.State.ourFin() || s.State == StateFinWait2 || s.State == StateClose) {
		return bad("unsent FIN in %s", s.State)
	}
	if s.Unsent != 0 && s.State.ourFin() && s.Flags&FlagFINUnsent == 0 {
		return bad("unsent data before a FIN that went out")
	}
	if s.Flags&FlagWScale != 0 {
		if s.SndWScale > maxWScale || s.RcvWScale > maxWScale {
			return bad("window scale %d/%d over %d", s.SndWScale, s.RcvWScale, maxWScale)
		}
	} else if s.SndWScale != 0 || s.RcvWScale != 0 {
		return bad("window scales without window scaling")
	}
	if s.Flags&FlagTimestamps == 0 && (s.Timestamp != 0 || s.Flags&FlagUsecTS != 0) {
		return bad("timestamp without timestamps negotiated")
	}
	if s.Timestamp&1 != 0 {
		return bad("odd timestamp (bit 0 is the microsecond flag)")
	}
	if s.MSSClamp < 64 || s.MSSClamp > 65535 {
		return bad("MSS clamp %d out of range", s.MSSClamp)
	}
	if int64(s.Unsent) > int64(len(s.SendQueue)) {
		return bad("unsent %d > send queue %d", s.Unsent, len(s.SendQueue))
	}
	if len(s.SendQueue) > 1<<30 || len(s.RecvQueue) > 1<<30 {
		return bad("queue over 1 GiB")
	}
	w := s.Window
	if w.MaxWindow < w.SndWnd {
		return bad("max_window %d < snd_wnd %d", w.MaxWindow, w.SndWnd)
	}
	if seqAfter(w.RcvWup, s.RecvSeq) {
		return bad("rcv_wup %d after rcv_nxt %d", w.RcvWup, s.RecvSeq)
	}
	if seqAfter(w.SndWl1, s.RecvSeq+w.RcvWnd) {
		return bad("snd_wl1 %d beyond the receive window", w.SndWl1)
	}
	if s.Flags&FlagHeld != 0 && s.State != StateEstablished {
		return bad("held in state %s", s.State)
	}
	if s.Flags&FlagHeld != 0 && (w.RcvWnd != 0 || w.RcvWup != s.RecvSeq) {
		return bad("held, but rcv_wnd %d and rcv_wup %d are not 0 and rcv_nxt %d", w.RcvWnd, w.RcvWup, s.RecvSeq)
	}
	maxWnd := uint64(65535) << s.RcvWScale
	if uint64(w.RcvWnd) > maxWnd {
		return bad("rcv_wnd %d over what scale %d can advertise", w.RcvWnd, s.RcvWScale)
	}
	if s.Shutdown&^(ShutRead|ShutWrite) != 0 || s.Shutdown&ShutWrite != 0 && !s.State.ourFin() {
		return bad("shutdown bits %#x impossible in %s", uint8(s.Shutdown), s.State)
	}
	return s.validateOptions(bad)
}

// validateOptions checks the options that a restore writes by name.
func (s *Snapshot) validateOptions(bad func(string, ...any) error) error {
	if s.Options.Mask&OptCongestion != 0 && len(s.Options.Congestion) >= 16 {
		return bad("congestion name too long")
	}
	if s.Options.Mask&OptBindToDevice != 0 && (len(s.Options.BindToDevice) == 0 || len(s.Options.BindToDevice) >= 16) {
		return bad("bad device name")
	}
	return nil
}

// seqAfter reports whether sequence number a comes after b (modulo 2^32).
func seqAfter(a, b uint32) bool { return int32(a-b) > 0 }
