package source

import (
	"context"
	"iter"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/shares"
	"github.com/tcpmigrate/tcpmigrate/repair"
)

// Waves (docs/handoff.md, "Waves and pre-copies"). A peer that is sending
// stalls from the moment its connection is paused or held, and a copy
// taken before the lock stands only for a connection that carries nothing.
// So when pre-copies are possible the connections go in two waves:
//
//  1. the ESTABLISHED connections that carried no data for QuietFor: paused
//     (a live hand-over), inspected again, held, drained, pre-copied
//     (precopy.go) and locked;
//  2. every other one: paused, inspected again, held (if ESTABLISHED),
//     drained and locked.
//
// The busy connections' owner serves them, and their peers send, until
// the second wave, whose work is a few milliseconds. Without pre-copies
// (or without the hold) there is one wave of every connection, as before.
// Each freeze is counted from the first wave's lock.

// DefaultQuietFor is how long a connection must have carried no data,
// either way, to go in the first wave and be pre-copied (Config.QuietFor).
const DefaultQuietFor = 100 * time.Millisecond

// waves returns the connections in the order they are paused, held and
// locked: one wave, or the quiet ones and then the rest; and whether the
// first wave is of quiet connections, to be pre-copied.
func (m *migration) waves() ([][]*conn, bool) {
	var live []*conn
	for _, c := range m.elig {
		if !c.done {
			live = append(live, c)
		}
	}
	if !m.wantPrecopy() || !m.lock.CanHold() {
		return [][]*conn{live}, false
	}
	quietFor := m.cfg.QuietFor
	if quietFor == 0 {
		quietFor = DefaultQuietFor
	}
	quiet := make([]bool, len(live))
	// TCP_INFO of each, on every core, before anything is paused: while
	// the owner still serves them, a busy connection shows it.
	shares.Chunks(len(live), minInspectShare, inspectChunk, func(chunks iter.Seq2[int, int]) error {
		for lo, hi := range chunks {
			for i := lo; i < hi; i++ {
				c := live[i]
				if c.snap.State != repair.StateEstablished {
					continue
				}
				d, err := repair.SinceData(c.fd)
				quiet[i] = err == nil && d >= quietFor
			}
		}
		return nil
	})
	var first, second []*conn
	for i, c := range live {
		if quiet[i] {
			first = append(first, c)
		} else {
			second = append(second, c)
		}
	}
	switch {
	case len(first) == 0:
		return [][]*conn{live}, false
	case len(second) == 0:
		return [][]*conn{first}, true
	case m.cfg.Pause != nil && !m.cfg.PauseWaves:
		// An owner that answers one pause: one wave, without copies
		// (the busy connections' peers would wait for them).
		return [][]*conn{live}, false
	}
	return [][]*conn{first, second}, true
}

// lockWaves pauses (with Config.Pause), inspects again, holds and locks
// each wave in turn, pre-copying the first wave's held connections before
// its lock. The phases of a second wave carry the suffix "-busy".
func (m *migration) lockWaves(ctx context.Context) error {
	waves, precopy := m.waves()
	for i, wave := range waves {
		suffix := ""
		if i > 0 {
			suffix = "-busy"
		}
		// A live owner is paused now, and its connections inspected
		// again. Both come before the hold: from the hold on the peers
		// wait, and every millisecond there is one of their stall.
		if m.cfg.Pause != nil {
			paused, err := m.pause(ctx, wave, "pause"+suffix)
			if err != nil {
				return err
			}
			if len(paused) > 0 {
				if err := m.reinspect(paused); err != nil {
					return err
				}
				m.endPhase("reinspect" + suffix)
			}
		}
		if i == 0 {
			if err := m.fault(StepLock); err != nil {
				return err
			}
		}
		var est []*conn
		for _, c := range wave {
			if !c.done && c.snap.State == repair.StateEstablished {
				est = append(est, c)
			}
		}
		held := len(est) > 0 && m.lock.CanHold() && m.holdWave(est)
		if held {
			m.endPhase("hold" + suffix)
		}
		if held && i == 0 && precopy {
			if err := m.precopy(ctx); err != nil {
				return err
			}
			if err := m.fault(StepPrecopied); err != nil {
				return err
			}
		}
		if err := m.lockWave(wave); err != nil {
			return err
		}
		m.endPhase("lock" + suffix)
	}
	return nil
}
