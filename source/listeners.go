package source

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/nsdo"
	"github.com/tcpmigrate/tcpmigrate/internal/procsock"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// ErrPendingLost marks a connection taken from a listener's accept queue
// that did not move: it cannot be put back into the queue, and nobody on
// this host would ever accept it, so Migrate resets it (docs/faults.md).
var ErrPendingLost = errors.New("source: connection taken from a listener's accept queue did not move and was reset")

// Listener is a listening socket that moves with the migration: the target
// recreates it (address, backlog, options) and delivers it with the
// connections, and the connections waiting in its accept queue (handshake
// done, not yet accepted by the program) are taken from it and migrated as
// established connections, delivered as pending accepts.
type Listener struct {
	// File is a descriptor of the listening socket. Migrate accepts from
	// it, so the program that owns the socket must not (send --pid freezes
	// it). Migrate closes File when the migration commits; otherwise it is
	// the caller's again.
	File *os.File
	// OwnerFD is the socket's descriptor number in the owning process, for
	// reports.
	OwnerFD int
}

// ListenerResult is what became of one listener.
type ListenerResult struct {
	Local netip.AddrPort
	// Pending is the number of connections taken from its accept queue.
	Pending int
	Outcome Outcome
	Err     error
}

// HandshakeWait bounds how long Migrate waits, with the listeners' SYNs
// locked, for handshakes in progress to finish before it takes the accept
// queues. It covers one retransmission of a lost SYN-ACK (1 s).
const HandshakeWait = 1500 * time.Millisecond

// listener is the source's bookkeeping for one Listener.
type listener struct {
	Listener
	fd      int
	desc    repair.Listener
	pending []*conn
	res     *ListenerResult
}

// ErrListenersUnsupported means the target speaks a protocol version that
// cannot move listeners (LISTENERS is version 2); Migrate refuses before
// anything is locked or taken.
var ErrListenersUnsupported = errors.New("source: the target speaks protocol version 1, which cannot move listeners")

// takeListeners runs before the connections are inspected: it describes
// each listener, locks its SYNs, waits for the handshakes in progress, and
// accepts what waits in the accept queues. The accepted connections join
// the migration's connections.
func (m *migration) takeListeners(ctx context.Context) error {
	if len(m.cfg.Listeners) == 0 {
		return m.fault(StepListeners)
	}
	// A version-1 target takes LISTENERS for a malformed message: refuse
	// now, while nothing is taken, rather than reset the queued
	// connections when it fails.
	if v := m.link.Version(); v < 2 {
		return fmt.Errorf("%w (link version %d, %d listeners)", ErrListenersUnsupported, v, len(m.cfg.Listeners))
	}
	m.res.Listeners = make([]ListenerResult, len(m.cfg.Listeners))
	for i, l := range m.cfg.Listeners {
		m.lsn = append(m.lsn, &listener{Listener: l, fd: rawFD(l.File), res: &m.res.Listeners[i]})
	}
	var eps []netip.AddrPort
	err := nsdo.Do(m.cfg.NetNS, func() error {
		for _, l := range m.lsn {
			if err := repair.DescribeListener(l.fd, &l.desc); err != nil {
				return err
			}
			if err := l.desc.Validate(); err != nil {
				return err
			}
			l.res.Local = l.desc.Local
			eps = append(eps, l.desc.Local)
		}
		return nil
	})
	if err != nil {
		return err
	}
	lock, err := firewall.NewListenLock(firewall.Config{Instance: m.listenLockInstance(), NetNS: m.cfg.NetNS, Lease: m.cfg.Lease})
	if err != nil {
		return err
	}
	m.lsnLock = lock
	lock.StartRenewer(func(err error) { m.log.Warn("listener lease renewal failed", "err", err) })
	if err := lock.Lock(eps); err != nil {
		return err
	}
	if err := m.awaitHandshakes(ctx, eps); err != nil {
		return err
	}
	for _, l := range m.lsn {
		if err := m.acceptPending(l); err != nil {
			return err
		}
		l.res.Pending = len(l.pending)
	}
	if err := m.fault(StepListeners); err != nil {
		return err
	}
	m.endPhase("listeners")
	return nil
}

// awaitHandshakes waits, up to HandshakeWait, until no handshake towards
// the locked listeners is in progress. Those still in progress after it
// (a peer that never sends its final ACK, or TCP_DEFER_ACCEPT waiting for
// data) stay behind and are logged.
func (m *migration) awaitHandshakes(ctx context.Context, eps []netip.AddrPort) error {
	deadline := time.Now().Add(HandshakeWait)
	for {
		n, err := procsock.Handshakes(m.cfg.NetNS, eps)
		if err != nil || n == 0 {
			return err
		}
		if time.Now().After(deadline) {
			m.log.Warn("handshakes still in progress stay behind", "count", n)
			return nil
		}
		select {
		case <-time.After(5 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// acceptPending accepts every connection waiting on l; poll first, as the
// descriptor may be blocking (its mode is the owner's).
func (m *migration) acceptPending(l *listener) error {
	// Each connection taken adds a result, which may move the others: every
	// connection is pointed at its result again once, on the way out.
	defer m.linkResults()
	for {
		pfd := []unix.PollFd{{Fd: int32(l.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("source: poll %s: %w", l.desc.String(), err)
		}
		if n == 0 || pfd[0].Revents&unix.POLLIN == 0 {
			return nil
		}
		fd, _, err := unix.Accept4(l.fd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err == unix.EAGAIN || err == unix.ECONNABORTED {
			return nil
		}
		if err != nil {
			return fmt.Errorf("source: accept on %s: %w", l.desc.String(), err)
		}
		c := &conn{Conn: Conn{File: os.NewFile(uintptr(fd), "tcp-pending"), OwnerFD: -1}, fd: fd, pendingOn: l}
		l.pending = append(l.pending, c)
		m.conns = append(m.conns, c)
		m.res.Conns = append(m.res.Conns, ConnResult{Index: uint32(len(m.res.Conns)), PendingOn: l.desc.Local})
		m.log.Info("pending connection taken", "listener", l.desc.Local.String(), "fd", fd)
	}
}

// sendListeners announces the listeners, with the wire indices of their
// eligible pending connections, right after Prepare.
func (m *migration) sendListeners(ctx context.Context) error {
	if len(m.lsn) == 0 {
		return nil
	}
	msg := &transport.Listeners{Migration: m.id}
	for _, l := range m.lsn {
		s := transport.ListenerSpec{Listener: l.desc}
		for _, c := range l.pending {
			if !c.done {
				s.Pending = append(s.Pending, c.index)
			}
		}
		msg.Listeners = append(msg.Listeners, s)
	}
	return m.link.Control().Send(ctx, msg)
}

// listenersReady takes the target's verdicts on the listeners. A listener
// the target cannot recreate fails the migration: moving the connections
// without their listener would leave new connections to nobody.
func (m *migration) listenersReady(msg *transport.ListenersReady) error {
	if m.lsnReady {
		return errors.New("source: LISTENERS_READY twice")
	}
	m.lsnReady = true
	if len(msg.Verdicts) != len(m.lsn) {
		return fmt.Errorf("source: %d listener verdicts for %d listeners", len(msg.Verdicts), len(m.lsn))
	}
	var errs []error
	for _, v := range msg.Verdicts {
		if int(v.Index) >= len(m.lsn) {
			return fmt.Errorf("source: verdict for unknown listener %d", v.Index)
		}
		if !v.OK() {
			l := m.lsn[v.Index]
			l.res.Err = fmt.Errorf("source: target refused %s: %s: %s", l.desc.String(), v.Code, v.Reason)
			errs = append(errs, l.res.Err)
		}
	}
	return errors.Join(errs...)
}

// awaitListeners waits for LISTENERS_READY if it has not come yet: before
// the lock (it may come before READY: awaitReady takes it then), or, with
// no connection, after PREPARED.
func (m *migration) awaitListeners(ctx context.Context) error {
	if len(m.lsn) == 0 || m.lsnReady {
		return nil
	}
	msg, err := m.await(ctx)
	if err != nil {
		return err
	}
	r, ok := msg.(*transport.ListenersReady)
	if !ok {
		return fmt.Errorf("source: unexpected %s while waiting for LISTENERS_READY", msg.Type())
	}
	return m.listenersReady(r)
}

// releaseListeners ends the source's part of the listeners: on commit, the
// source copies are closed and the listeners reported committed; the
// listener lock goes (on commit after the old owner is gone:
// Config.BeforeRelease), except in doubt, when it stays with its lease
// running out, for recover to remove once it has resolved the migration.
// It is idempotent.
func (m *migration) releaseListeners(committed bool) error {
	for _, l := range m.lsn {
		if committed && l.res.Outcome == "" {
			l.res.Outcome = Committed
			l.File.Close()
		}
	}
	if m.lsnLock == nil {
		return nil
	}
	var err error
	if m.state == StateInDoubt {
		m.lsnLock.StopRenewer()
	} else {
		err = m.lsnLock.Close()
	}
	m.lsnLock = nil
	return err
}

// settleListeners settles the listeners (those without an outcome stayed
// here) and resets the connections taken from accept queues that did not
// move (refused, rolled back): they cannot go back into a queue and no
// program here holds them. SO_LINGER 0 makes the close an immediate RST,
// so the peer learns at once that its connection was not served. In doubt
// they are left alone: they are in repair mode and may live on the target.
func (m *migration) settleListeners() {
	m.releaseListeners(false)
	for _, l := range m.lsn {
		if l.res.Outcome == "" {
			l.res.Outcome = RolledBack
			if m.state == StateInDoubt {
				l.res.Outcome, l.res.Err = Failed, ErrInDoubt
			}
		}
	}
	for _, c := range m.conns {
		// A committed connection is the target's, or was lost there
		// (Committed.Failed, outcome Failed): finish closed its socket, and
		// its descriptor number may be another socket's by now.
		if c.pendingOn == nil || c.committed || errors.Is(c.res.Err, ErrInDoubt) {
			continue
		}
		unix.SetsockoptLinger(c.fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		c.File.Close()
		c.res.Outcome, c.res.Err = Failed, errors.Join(ErrPendingLost, c.res.Err)
		m.log.Error("pending connection lost: reset", "conn", c.res.Index, "local", c.res.Local.String(), "remote", c.res.Remote.String())
	}
}
