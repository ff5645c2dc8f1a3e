package target

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/nsdo"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// ErrListeners means the source's LISTENERS message was out of place (sent
// twice) or named connections the migration does not have.
var ErrListeners = errors.New("target: bad listeners")

// NetListener turns a delivered listening socket (Delivered.Listener) into a
// net.Listener (and closes File).
func (d *Delivered) NetListener() (net.Listener, error) {
	ln, err := net.FileListener(d.File)
	d.File.Close()
	return ln, err
}

// ListenerReport is what became of one listening socket on the target.
type ListenerReport struct {
	// Local is the listener's address.
	Local netip.AddrPort
	// Pending is how many connections of its accept queue came with it.
	Pending int
	// Verdict is the target's answer to the source.
	Verdict transport.VerdictCode
	// Delivered says whether the application got it.
	Delivered bool
	Err       error
}

// listenerSet is the target's part of a migration's listeners: recreated
// sockets, bound and listening from the prepare phase, behind a listener
// lock that drops inbound SYNs until the commit delivers them.
type listenerSet struct {
	specs   []transport.ListenerSpec
	fds     []int // -1 when refused, failed or handed on
	reports []ListenerReport
	lock    *firewall.ListenLock
	// pendingOf maps a connection index to the listener it was pending on.
	pendingOf map[uint32]int
}

// checkListener applies the policy to one listener: its address (an
// unspecified one only when the policy allows every address the socket
// takes: both families for a dual-stack [::]), its port, its mark, and its
// pending connections' indices.
func (p *Policy) checkListener(s *transport.ListenerSpec, count uint32) error {
	l := &s.Listener
	a := l.Local.Addr().Unmap()
	if a.IsUnspecified() {
		families := []bool{a.Is4()} // by Is4
		if l.Family == unix.AF_INET6 && a.Is6() && !l.V6Only {
			// A dual-stack [::] listener takes port P on every IPv4
			// address of the host as well.
			families = append(families, true)
		}
		for _, v4 := range families {
			if !p.allowsEvery(v4) {
				all := netip.PrefixFrom(netip.IPv6Unspecified(), 0)
				if v4 {
					all = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
				}
				return &Refusal{Code: transport.VerdictRefused,
					Err: fmt.Errorf("%w: listener on %v (v6only %t) takes every address, and %v is not in the allow-list", ErrNotAllowed, l.Local, l.V6Only, all)}
			}
		}
	} else if !p.allowedAddr(a) {
		return &Refusal{Code: transport.VerdictRefused,
			Err: fmt.Errorf("%w: listener address %s is not in the allow-list", ErrNotAllowed, a)}
	}
	if len(p.AllowPorts) > 0 && !slices.Contains(p.AllowPorts, l.Local.Port()) {
		return &Refusal{Code: transport.VerdictRefused,
			Err: fmt.Errorf("%w: listener port %d is not in the allowed ports", ErrNotAllowed, l.Local.Port())}
	}
	if l.Mark == firewall.DefaultBypassMark {
		return &Refusal{Code: transport.VerdictRefused,
			Err: fmt.Errorf("%w: listener %v: socket mark %#x is the lock's bypass mark", ErrNotAllowed, l.Local, l.Mark)}
	}
	for _, i := range s.Pending {
		if i >= count {
			return &Refusal{Code: transport.VerdictInvalid,
				Err: fmt.Errorf("%w: listener %v: pending connection %d of %d", ErrListeners, l.Local, i, count)}
		}
	}
	return nil
}

// allowsEvery reports whether the allow-list holds every address of a
// family (0.0.0.0/0 or ::ffff:0.0.0.0/96 for IPv4, ::/0 for IPv6).
func (p *Policy) allowsEvery(v4 bool) bool {
	return slices.ContainsFunc(p.Allow, func(pr netip.Prefix) bool {
		if v4 && pr.Addr().Is4In6() {
			return pr.Bits() <= 96
		}
		return pr.Bits() == 0 && pr.Addr().Is4() == v4
	})
}

// listen answers LISTENERS: each listener is checked against the policy,
// locked (SYNs dropped) and recreated; the verdicts go back in
// LISTENERS_READY. An error here aborts the migration.
func (m *migration) listen(ctx context.Context, msg *transport.Listeners) error {
	if m.lsn != nil {
		return fmt.Errorf("%w: LISTENERS sent twice", ErrListeners)
	}
	// A listener bound without SO_REUSEADDR would conflict with Blanks of
	// its port (repair.Blank), and PortHeld below would count them as a
	// local socket holding it: they are closed first, and made again once
	// the listeners exist (in repair mode a Blank binds with the kernel's
	// forced reuse, as every restored socket does), unless the freeze has
	// begun.
	remake := m.blanks.making()
	m.blanks.release()
	cfg := &m.srv.cfg
	ls := &listenerSet{specs: msg.Listeners, pendingOf: map[uint32]int{}}
	m.lsn = ls
	var eps []netip.AddrPort
	for i := range ls.specs {
		s := &ls.specs[i]
		r := ListenerReport{Local: s.Listener.Local, Pending: len(s.Pending)}
		if err := m.srv.guard.pol.checkListener(s, m.count); err != nil {
			r.Verdict, r.Err = verdictOf(err), err
		} else {
			eps = append(eps, s.Listener.Local)
		}
		for _, p := range s.Pending {
			ls.pendingOf[p] = i
		}
		ls.reports = append(ls.reports, r)
		ls.fds = append(ls.fds, -1)
	}
	lock, err := firewall.NewListenLock(firewall.Config{Instance: "tgtl-" + m.id.String()[:16], NetNS: cfg.NetNS,
		Lease: max(m.lease, firewall.MinLease)})
	if err != nil {
		return err
	}
	ls.lock = lock
	lock.StartRenewer(func(err error) { m.log.Warn("listener lease renewal failed", "err", err) })
	// Locked before it exists: no SYN ever meets the new listener before
	// the commit.
	if err := lock.Lock(eps); err != nil {
		return err
	}
	err = nsdo.Do(cfg.NetNS, func() error {
		// First, before any listener of the set exists: a listener with
		// SO_REUSEPORT on a port a local socket holds would join a local
		// service's reuseport group and take a share of its connections.
		for i := range ls.specs {
			r, l := &ls.reports[i], &ls.specs[i].Listener
			if r.Err != nil || !l.ReusePort {
				continue
			}
			held, err := repair.PortHeld(l)
			if err == nil && held {
				err = fmt.Errorf("%w: listener %v asks for SO_REUSEPORT and a local socket holds the port: it would share that socket's connections", ErrNotAllowed, l.Local)
			}
			if err != nil {
				r.Verdict, r.Err = transport.VerdictConflict, err
			}
		}
		for i := range ls.specs {
			r := &ls.reports[i]
			if r.Err != nil {
				continue
			}
			fd, err := repair.Listen(&ls.specs[i].Listener)
			if err != nil {
				r.Verdict, r.Err = transport.VerdictFailed, err
				if errors.Is(err, unix.EADDRINUSE) {
					r.Verdict = transport.VerdictConflict
				}
				continue
			}
			ls.fds[i], r.Verdict = fd, transport.VerdictOK
		}
		return nil
	})
	if err != nil {
		// The namespace could not be entered (then no verdict has a
		// code) or left: the abort closes what was made, and the lock.
		return err
	}
	if remake {
		m.startBlanks()
	}
	// A listener that could not be recreated (most often EADDRINUSE: a
	// local service owns the port) is not the target's: its endpoint is
	// let go at once, so that a source cannot black-hole a local service's
	// port for the rest of the migration.
	if err := lock.Unlock(ls.failedEndpoints()); err != nil {
		return err
	}
	vs := make([]transport.Verdict, len(ls.reports))
	for i, r := range ls.reports {
		vs[i] = transport.Verdict{Index: uint32(i), Code: r.Verdict}
		if r.Err != nil {
			vs[i].Reason = r.Err.Error()
			m.log.Info("listener refused", "listener", r.Local.String(), "reason", vs[i].Reason)
		}
	}
	return m.link.Control().Send(ctx, &transport.ListenersReady{Migration: m.id, Verdicts: vs})
}

// failedEndpoints returns the endpoints of the listeners that were refused
// or could not be recreated (the lock ignores those it does not hold),
// less those another listener of the set holds.
func (ls *listenerSet) failedEndpoints() []netip.AddrPort {
	var failed []netip.AddrPort
	for i, fd := range ls.fds {
		if fd < 0 {
			failed = append(failed, ls.specs[i].Listener.Local)
		}
	}
	return slices.DeleteFunc(failed, func(ep netip.AddrPort) bool {
		for i, fd := range ls.fds {
			if fd >= 0 && ls.specs[i].Listener.Local == ep {
				return true
			}
		}
		return false
	})
}

// isPending says whether c was taken from a listener's accept queue on the
// source (it is delivered with the listeners).
func (m *migration) isPending(c *conn) bool {
	if m.lsn == nil {
		return false
	}
	_, ok := m.lsn.pendingOf[c.report.Index]
	return ok
}

// deliver hands committed connections, and with withListeners the
// listeners too, to the application in one call of Config.Deliver; it
// returns the failures of connections, as Deliver does. The listener lock
// goes once the listeners are the application's: the SYNs it dropped are
// retransmitted by the peers and reach the new instance.
func (m *migration) deliver(ctx context.Context, conns []*Delivered, withListeners bool) map[uint32]error {
	ls := m.lsn
	if ls == nil || !withListeners {
		// No connection pending on a listener comes without the listeners.
		if m.srv.cfg.Deliver == nil {
			return nil
		}
		return m.onlyOf(conns, m.srv.cfg.Deliver(ctx, conns))
	}
	all := slices.Clone(conns)
	for _, d := range all {
		if i, ok := ls.pendingOf[d.Index]; ok {
			d.PendingOn = ls.specs[i].Listener.Local
		}
	}
	first := uint32(m.count) // listener i is delivered with index count+i
	for i, fd := range ls.fds {
		if fd < 0 {
			continue
		}
		l := &ls.specs[i].Listener
		all = append(all, &Delivered{File: os.NewFile(uintptr(fd), "tcp-listen:"+l.Local.String()), Local: l.Local,
			Listener: true, Migration: m.id, Index: first + uint32(i)})
		ls.fds[i] = -1
	}
	var fails map[uint32]error
	if m.srv.cfg.Deliver != nil {
		fails = m.srv.cfg.Deliver(ctx, all)
	}
	out := map[uint32]error{}
	for i, err := range fails {
		if i < first {
			out[i] = err
			continue
		}
		if j := int(i - first); j < len(ls.reports) {
			ls.reports[j].Err = err
		}
	}
	for i := range ls.reports {
		if r := &ls.reports[i]; r.Verdict == transport.VerdictOK && r.Err == nil {
			r.Delivered = true
		}
	}
	if ls.lock != nil {
		if err := ls.lock.Close(); err != nil {
			m.log.Warn("listener lock", "err", err)
		}
	}
	return m.onlyOf(conns, out)
}

// onlyOf returns the failures in fails that name one of conns, the
// connections of one Deliver call; an index the application made up, or
// one of the other delivery, is logged and ignored.
func (m *migration) onlyOf(conns []*Delivered, fails map[uint32]error) map[uint32]error {
	if len(fails) == 0 {
		return fails
	}
	in := make(map[uint32]bool, len(conns))
	for _, d := range conns {
		in[d.Index] = true
	}
	for i, err := range fails {
		if !in[i] {
			m.log.Warn("Deliver reported a failure of a connection it was not given", "conn", i, "err", err)
			delete(fails, i)
		}
	}
	return fails
}

// closeListeners closes the recreated listeners and their lock (abort, or
// the end of a commit). A listener behind the lock never completed a
// handshake, so closing it resets nobody.
func (m *migration) closeListeners() error {
	ls := m.lsn
	if ls == nil {
		return nil
	}
	for i, fd := range ls.fds {
		if fd >= 0 {
			unix.Close(fd)
			ls.fds[i] = -1
		}
	}
	if ls.lock != nil {
		return ls.lock.Close()
	}
	return nil
}

// listenerReports returns the reports of the migration's listeners.
func (m *migration) listenerReports() []ListenerReport {
	if m.lsn == nil {
		return nil
	}
	return slices.Clone(m.lsn.reports)
}
