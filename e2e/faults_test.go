package e2e

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/source"
	"github.com/tcpmigrate/tcpmigrate/target"
)

var errInjected = errors.New("injected fault")

// TestFaultMatrix makes every step of both agents fail in turn, with live
// streaming connections, and checks where each connection ends: a failure
// before the commit leaves every connection on the source with its streams
// intact; a failure after it leaves them on the target, except a failed
// delivery, which loses them (docs/handoff.md). Nobody sees a reset unless
// the connection was lost.
func TestFaultMatrix(t *testing.T) {
	for _, step := range source.Steps {
		t.Run("source-"+string(step), func(t *testing.T) {
			fault := func(s source.Step) error {
				if s == step {
					return errInjected
				}
				return nil
			}
			want := source.RolledBack
			if step == source.StepFinish {
				want = source.Committed
			}
			// The pre-copies' step is reached only with connections
			// quiet enough to be pre-copied.
			runFault(t, fault, nil, want, step == source.StepPrecopied)
		})
	}
	for _, step := range target.Steps {
		t.Run("target-"+string(step), func(t *testing.T) {
			fault := func(s target.Step) error {
				if s == step {
					return errInjected
				}
				return nil
			}
			want := source.RolledBack
			if step == target.StepDeliver {
				want = source.Failed
			}
			runFault(t, nil, fault, want, false)
		})
	}
	// With pre-copies, where a failure finds copies restored on the
	// target ahead of the freeze (discarded silently at its abort), or
	// copies confirmed after the lock.
	for _, step := range []source.Step{source.StepCapture, source.StepVerdicts, source.StepCommit} {
		t.Run("precopy-source-"+string(step), func(t *testing.T) {
			runFault(t, func(s source.Step) error {
				if s == step {
					return errInjected
				}
				return nil
			}, nil, source.RolledBack, true)
		})
	}
	for _, step := range []target.Step{target.StepRestore, target.StepPrepared, target.StepCommit} {
		t.Run("precopy-target-"+string(step), func(t *testing.T) {
			runFault(t, nil, func(s target.Step) error {
				if s == step {
					return errInjected
				}
				return nil
			}, source.RolledBack, true)
		})
	}
}

// runFault migrates four streaming connections with the faults sf and tf
// and checks that each ends as want; precopy makes them all quiet enough to
// be pre-copied (Config.QuietFor < 0).
func runFault(t *testing.T, sf func(source.Step) error, tf func(target.Step) error, want source.Outcome, precopy bool) {
	w := newWorld(t, 4)
	cfg, srv := w.agents([]netip.Prefix{svc}, sf, tf)
	if precopy {
		cfg.QuietFor = -1
	}
	res, err := source.Migrate(ctxT(t), cfg, w.handOver())
	t.Logf("migrate: state %s, err %v", res.State, err)
	for _, c := range res.Conns {
		if c.Outcome != want {
			t.Errorf("connection %d: %s (%v), want %s", c.Index, c.Outcome, c.Err, want)
		}
	}
	if want == source.RolledBack && err == nil {
		t.Error("a rolled-back migration returned no error")
	}
	if got := srv.Outcome(res.Migration); want == source.Committed && got.String() != "committed" {
		t.Errorf("the target recorded %s", got)
	}
	switch want {
	case source.RolledBack:
		w.restart(res)
		w.check(300 * time.Millisecond)
	case source.Committed:
		for _, c := range w.conns {
			c.Close()
		}
		w.check(300 * time.Millisecond)
	case source.Failed:
		// The documented loss: the target could not deliver and closed
		// the sockets. Only the outcome is checked.
		w.watch.stop()
		for _, cl := range w.clients {
			cl.Pause()
		}
	}
}
