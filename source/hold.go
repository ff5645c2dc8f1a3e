package source

import (
	"iter"
	"sync"
	"time"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/nsdo"
	"github.com/tcpmigrate/tcpmigrate/internal/shares"
	"github.com/tcpmigrate/tcpmigrate/repair"
)

// The zero-window hold (REPAIR-NOTES 10.4, docs/handoff.md): before the
// lock, the source makes its connections advertise a window of 0 and waits
// until their peers have nothing left in flight, so that the lock drops
// nothing of theirs and they wait in zero-window persist mode instead of
// retransmission backoff. The target restores the window the peer
// believes in and kicks each socket into announcing its open window.

// DefaultHoldDrain bounds the wait for the peers to stop sending
// (Config.HoldDrain).
const DefaultHoldDrain = 200 * time.Millisecond

// holder is the source's part of the hold for one migration. The hold is
// used when the lock can hold (Lock.CanHold): newLock asks for it only when
// wantHold, and the kernel may still refuse it.
type holder struct {
	mu  sync.Mutex       // guards inj
	inj *repair.Injector // for Announce and the kicks of rolled-back connections, opened on first use
}

// wantHold reports whether this migration should hold its connections:
// the configuration does not turn the hold off and the target can restore
// held connections (it advertised repair.FeatHeldRestore).
func (m *migration) wantHold() bool {
	return !m.cfg.NoHold && m.link.Peer().Features.Has(repair.FeatHeldRestore)
}

// minAnnounceShare is the fewest announcements worth a goroutine of their
// own, and how many a goroutine takes at a time.
const minAnnounceShare = 32

// holdWave holds conns, makes each announce its zero window and waits for
// their peers to drain. It reports whether they are held.
func (m *migration) holdWave(held []*conn) bool {
	tuples := make([]firewall.Tuple, len(held))
	fds := make([]int, len(held))
	for i, c := range held {
		tuples[i], fds[i] = c.tuple, c.fd
	}
	// The injector first (a switch into the namespace and its raw
	// sockets): a peer that is sending stalls from the hold batch on.
	inj, injErr := m.injector()
	if err := m.lock.Hold(tuples); err != nil {
		m.log.Warn("zero-window hold failed: locking without it", "err", err)
		return false
	}
	for _, c := range held {
		c.held = true
	}
	m.res.Held += len(held)
	// Every held socket sends one ACK now (with window 0), so that idle
	// peers learn of the hold too.
	if injErr != nil {
		m.log.Warn("zero-window hold: cannot announce it", "err", injErr)
	} else {
		// On every core, in chunks handed to whichever is free: each
		// announcement costs about 8 µs (a moment in repair mode, and the
		// send, inside which our socket answers and, on a host with the
		// peer, the peer reads the answer).
		shares.Chunks(len(held), minAnnounceShare, minAnnounceShare, func(chunks iter.Seq2[int, int]) error {
			for lo, hi := range chunks {
				for _, c := range held[lo:hi] {
					if err := repair.Announce(inj, c.fd, &c.snap); err != nil {
						m.log.Warn("zero-window hold: cannot announce it", "conn", c.tuple.String(), "err", err)
					}
				}
			}
			return nil
		})
	}
	limit := m.cfg.HoldDrain
	if limit == 0 {
		limit = DefaultHoldDrain
	}
	start := time.Now()
	left, err := repair.Drain(fds, limit)
	if err != nil || left > 0 {
		m.log.Warn("zero-window hold: peers still sending at the lock", "conns", len(fds), "still_receiving", left, "err", err)
	}
	m.log.Debug("zero-window hold drained", "conns", len(fds), "took", time.Since(start))
	return true
}

// resumeSocket takes a captured connection out of repair mode on the
// source (a rollback). One whose peer was held leaves repair without the
// window probe and is kicked, so that it announces its open window now;
// the others leave with the kernel's probe.
func (m *migration) resumeSocket(c *conn) error {
	if c.snap.Flags&repair.FlagHeld == 0 {
		return repair.Resume(c.fd, &c.snap)
	}
	inj, err := m.injector()
	if err != nil {
		// Without a kick the peer learns the window at its next persist
		// probe; the connection is fine, only slower to resume.
		m.log.Warn("no kick for a held connection", "conn", c.tuple.String(), "err", err)
		return repair.Resume(c.fd, &c.snap)
	}
	r := repair.Restorer{Injector: inj}
	return r.Resume(c.fd, &c.snap)
}

// unhold tells the peer of a held connection rolled back before its
// capture (its hold and lock already gone) that the window is open again:
// the socket announces its real window (repair.Announce), where it would
// otherwise wait for the peer's next persist probe (200 ms or more).
func (m *migration) unhold(c *conn) {
	inj, err := m.injector()
	if err == nil {
		err = repair.Announce(inj, c.fd, &c.snap)
	}
	if err != nil {
		m.log.Warn("zero-window hold: cannot reopen the window at once", "conn", c.tuple.String(), "err", err)
	}
}

// injector returns the migration's injector, opening it in the sockets'
// namespace with the lock's bypass mark the first time.
func (m *migration) injector() (*repair.Injector, error) {
	m.hold.mu.Lock()
	defer m.hold.mu.Unlock()
	if m.hold.inj != nil {
		return m.hold.inj, nil
	}
	err := nsdo.Do(m.cfg.NetNS, func() (err error) {
		m.hold.inj, err = repair.NewInjector(m.lock.BypassMark())
		return err
	})
	return m.hold.inj, err
}

// closeHold closes the injector, if one was opened.
func (m *migration) closeHold() error {
	m.hold.mu.Lock()
	defer m.hold.mu.Unlock()
	if m.hold.inj == nil {
		return nil
	}
	err := m.hold.inj.Close()
	m.hold.inj = nil
	return err
}
