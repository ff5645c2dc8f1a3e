package repair

import (
	"errors"
	"math"
	"net/netip"

	"golang.org/x/sys/unix"
)

// Blank is a socket made ahead of a restore, before the connection it is
// for is frozen: the part of Restore that depends only on the local address
// (socket, repair mode, the inflated buffers, bind). A target that knows
// the 4-tuples of a migration before the source locks them makes one Blank
// per connection while it waits, and Restorer.RestoreBlank finishes each
// inside the freeze with the sequence-dependent steps alone, about half of
// a restore's system calls (docs/performance.md).
//
// A Blank is in repair mode, bound and never connected: closing it is
// silent, and it takes no part in the host's traffic (a bound socket that
// neither listens nor connects matches no packet). Being in repair mode it
// binds with the kernel's forced reuse, as a restore does; a listener bound
// later to the same port without SO_REUSEADDR conflicts with it, so a
// target that is about to recreate listeners closes its Blanks first.
//
// The zero Blank holds no socket: Fits reports false and Close does
// nothing, so a caller may use new(Blank) as a placeholder.
type Blank struct {
	fd       int  // the socket, while open
	open     bool // fd is the Blank's own: false in the zero Blank, and once used or closed
	family   uint16
	local    netip.AddrPort
	notLocal bool         // bound with IP_TRANSPARENT: the address is not on this host yet
	preset   presetValues // the values of presetOpts on the socket, if presetOK
	presetOK bool         // Restorer.Preset ran
}

// NewBlank makes a Blank for connections whose local end is local, in the
// calling thread's network namespace. An IPv4 address gives an AF_INET
// socket and any other an AF_INET6 one, so a Blank fits connections of
// exactly that family (an IPv4-mapped address, for an AF_INET6 socket with
// IPV6_V6ONLY off, must be given mapped). IPV6_V6ONLY needs no choice: the
// bind to an IPv6 address that is not mapped turns it on by itself
// (__inet6_bind), here as on the source. If local is not an address of this
// host yet, the socket is made transparent to bind it, as Restore does.
func NewBlank(local netip.AddrPort) (*Blank, error) {
	b := &Blank{family: unix.AF_INET6, local: local}
	if local.Addr().Is4() {
		b.family = unix.AF_INET
	}
	fail := func(op string, err error) (*Blank, error) {
		b.Close()
		return nil, &OpError{Op: "make a blank socket: " + op, Local: local, Err: err}
	}
	if !local.IsValid() || local.Port() == 0 {
		return nil, &OpError{Op: "make a blank socket", Local: local, Err: errors.New("no local address and port")}
	}
	fd, err := unix.Socket(int(b.family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return fail("socket", err)
	}
	b.fd, b.open = fd, true
	if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		return fail("turn repair on", err)
	}
	if b.family == unix.AF_INET6 {
		if err := setIntRaw(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			return fail("setsockopt IPV6_V6ONLY", err)
		}
	}
	if op, err := inflateBuffers(fd); err != nil {
		return fail(op, err)
	}
	notLocal, op, err := bindLocal(fd, b.family, local)
	if err != nil {
		return fail(op, err)
	}
	b.notLocal = notLocal
	return b, nil
}

// bindLocal binds fd, a socket of family in repair mode, to local. If
// local is not an address of this host (EADDRNOTAVAIL) it makes the socket
// transparent (IP_TRANSPARENT or IPV6_TRANSPARENT) and binds again, and
// reports notLocal. On error it names the failed operation.
func bindLocal(fd int, family uint16, local netip.AddrPort) (notLocal bool, op string, err error) {
	err = bindRaw(fd, family, local)
	if !errors.Is(err, unix.EADDRNOTAVAIL) {
		if err != nil {
			return false, "bind", err
		}
		return false, "", nil
	}
	level, transparent, _ := ipLevel(family)
	if err := setIntRaw(fd, level, transparent, 1); err != nil {
		return false, "setsockopt IP_TRANSPARENT (local address not on this host)", err
	}
	if err := bindRaw(fd, family, local); err != nil {
		return false, "bind (transparent)", err
	}
	return true, "", nil
}

// Local returns the address the Blank is bound to.
func (b *Blank) Local() netip.AddrPort { return b.local }

// Close closes the socket of a Blank that was not used. It is silent (the
// socket is in repair mode and never connected), safe to call twice, and
// does nothing on a nil, zero or used Blank.
func (b *Blank) Close() error {
	fd, ok := b.take()
	if !ok {
		return nil
	}
	return unix.Close(fd)
}

// take hands over the Blank's socket, if it has one, to the caller.
func (b *Blank) take() (fd int, ok bool) {
	if b == nil || !b.open {
		return -1, false
	}
	b.open = false
	return b.fd, true
}

// Fits reports whether s can be restored on b: same family and local
// address, a state whose restore starts with a bind (not SYN_SENT, whose
// buffers must be final before its connect), and no SO_BINDTODEVICE (the
// bind of a restore takes the device into account). IPV6_V6ONLY follows
// from the address (NewBlank), and Validate refuses it on a mapped one.
func (b *Blank) Fits(s *Snapshot) bool {
	return b != nil && b.open && s.Family == b.family && s.Local == b.local && s.State != StateSynSent &&
		s.Options.Mask&OptBindToDevice == 0
}

// inflateBuffers raises both buffers far above any queue, so the queue
// writes of a restore never meet a full buffer; writeLateOptions puts the
// source's sizes back.
func inflateBuffers(fd int) (op string, err error) {
	if err := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, math.MaxInt32/2); err != nil {
		return "setsockopt SO_SNDBUFFORCE", err
	}
	if err := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, math.MaxInt32/2); err != nil {
		return "setsockopt SO_RCVBUFFORCE", err
	}
	return "", nil
}

// RestoreBlank is Restore on a socket made ahead of the freeze: if b fits
// s (same family and local address, not SYN_SENT, no SO_BINDTODEVICE on
// the source socket) it restores s on b's socket, with only the steps that
// need the frozen state; otherwise it closes b and restores s on a new
// socket, exactly as Restore. Either way b is used up: the caller must not
// close it or use it again. The result and its contract are Restore's.
func (r *Restorer) RestoreBlank(b *Blank, s *Snapshot) (fd int, err error) {
	return r.restore(b, s)
}
