package source

import (
	"context"
	"errors"
	"fmt"

	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// Pre-copies (docs/handoff.md, "Pre-copies"): once the held connections'
// peers have nothing in flight, the source captures each of them while it
// is still live (repair.Precapture) and streams the copy to the target,
// which restores it before the lock. After the lock captureShare asks each
// copied connection whether it moved (repair.Unchanged): one that did not
// is confirmed with a record of a few bytes, and the target only has to
// wake it at the commit; one that did is captured again. The freeze is then
// the lock, one TCP_INFO read per connection, the confirmations and the
// commit, whatever the queues hold.

// wantPrecopy reports whether this migration pre-copies its quiet held
// connections: the configuration allows it, the link speaks version 3 and
// there are streams to carry the copies.
func (m *migration) wantPrecopy() bool {
	return !m.cfg.NoPrecopy && m.link.Version() >= 3 && len(m.writers) > 0
}

// precopy captures the held connections (the first wave: waves.go), each
// on the stream that will carry its final record, and flushes the streams,
// so that the target has them
// all before the lock. A connection that cannot be copied is captured after
// the lock as without pre-copies; a stream that fails fails the migration
// (nothing is locked yet: the rollback unholds the connections).
func (m *migration) precopy(ctx context.Context) error {
	type result struct {
		copied int
		err    error
	}
	n := len(m.writers)
	results := make(chan result, n)
	for s := range n {
		go func() {
			k, err := m.precopyShare(m.writers[s], s, n)
			results <- result{k, err}
		}()
	}
	var first error
	for range n {
		r := <-results
		m.res.Precopied += r.copied
		if r.err != nil && first == nil {
			first = r.err
		}
	}
	if first != nil || m.res.Precopied == 0 {
		m.endPhase("precopy")
		return first
	}
	// The target restores the copies as they come, on the same cores as
	// these captures: it is told how many there are and says when it has
	// them all, so that none of those restores is left for the freeze.
	if err := m.link.Control().Send(ctx, &transport.Precopied{Migration: m.id, Count: uint32(m.res.Precopied)}); err != nil {
		return err
	}
	msg, err := m.await(ctx)
	if err != nil {
		return err
	}
	done, ok := msg.(*transport.PrecopyDone)
	if !ok {
		return fmt.Errorf("source: unexpected %s while waiting for PRECOPY_DONE", msg.Type())
	}
	if done.Count != uint32(m.res.Precopied) {
		return fmt.Errorf("source: the target restored %d pre-copies of %d", done.Count, m.res.Precopied)
	}
	m.endPhase("precopy")
	return nil
}

// precopyShare copies the held connections of one share (those captureShare
// will write on w) and writes the copies on w, flushed.
func (m *migration) precopyShare(w *transport.SnapshotWriter, share, n int) (int, error) {
	var scratch repair.Snapshot
	copied := 0
	for i := share; i < len(m.elig); i += n {
		c := m.elig[i]
		if !c.held || c.done {
			continue
		}
		c.load(&scratch)
		mark, err := repair.Precapture(c.fd, &scratch)
		if err != nil {
			m.log.Debug("no pre-copy: captured in the freeze", "conn", c.tuple.String(), "err", err)
			continue
		}
		scratch.MarkHeld()
		if err := w.WritePre(c.index, &scratch, c.AppState); err != nil {
			var le *transport.LimitError
			if errors.As(err, &le) {
				// Nothing was written (the stream is fine): this one and
				// the rest of the share are captured under the lock.
				m.log.Info("pre-copies stop at a limit of the target's", "conn", c.tuple.String(), "err", err)
				break
			}
			return copied, err
		}
		c.mark, c.preRaw = mark, len(scratch.RecvQueue)+len(scratch.SendQueue)
		c.keep(&scratch)
		if copied++; copied == 1 || copied%flushEvery == 0 {
			if err := w.Flush(); err != nil {
				return copied, err
			}
		}
	}
	return copied, w.Flush()
}
