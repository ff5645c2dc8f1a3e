// Package recovery cleans up after an agent that died in the middle of a
// migration, guided by the journal it left (internal/journal): it rolls the
// source back or finishes its commit (asking the target when the outcome
// is in doubt), thaws a frozen process, and removes the locks of dead
// agents. It is what `tcpmigrate recover` runs.
package recovery

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/addrmove"
	"github.com/tcpmigrate/tcpmigrate/internal/freeze"
	"github.com/tcpmigrate/tcpmigrate/internal/journal"
	"github.com/tcpmigrate/tcpmigrate/internal/procsock"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/source"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// Options configure a recovery run.
type Options struct {
	// JournalDir is the agents' journal directory ("" = the default).
	JournalDir string
	// Transport, if set, lets recovery ask a target what became of an
	// in-doubt migration.
	Transport *transport.Config
	// DryRun reports what would be done without doing it.
	DryRun bool
}

// Action is one thing recovery did (or would do) for one migration.
type Action struct {
	Migration string
	Role      journal.Role
	State     string // the state the journal recorded
	Decision  string // what recovery concluded
	Err       error
}

// Run recovers every migration of the journal whose agent is dead, and
// removes the firewall tables of dead agents in the current namespace.
func Run(ctx context.Context, o Options) ([]Action, error) {
	jr, err := journal.Open(o.JournalDir)
	if err != nil {
		return nil, err
	}
	recs, err := jr.List()
	if err != nil && !errors.Is(err, journal.ErrBadRecord) {
		return nil, err
	}
	// A record that cannot be read does not stop the others' recovery; it
	// is reported, and, since the lock it names is unknown, no lock table is
	// swept in this run (run recover again once the file is dealt with).
	badRecords := err != nil
	var acts []Action
	errs := []error{err}
	unresolved := map[string]bool{} // lock tables that must stay
	for _, r := range recs {
		if alive(r.AgentPID) {
			continue // a live agent owns it
		}
		a := Action{Migration: r.Migration, Role: r.Role, State: r.State}
		switch r.Role {
		case journal.Source:
			a.Decision, a.Err = recoverSource(ctx, o, r)
		case journal.Target:
			a.Decision, a.Err = recoverTarget(r)
		}
		if a.Err == nil && !o.DryRun && r.Role == journal.Source {
			a.Err = jr.Remove(r)
		}
		if a.Err != nil {
			unresolved[r.Lock], unresolved[r.ListenLock] = true, true
			errs = append(errs, fmt.Errorf("recovery: %s %s: %w", r.Role, r.Migration, a.Err))
		}
		acts = append(acts, a)
	}
	if !o.DryRun && !badRecords {
		swept, err := firewall.Sweep(0, func(instance string) bool { return unresolved[firewall.TableName(instance)] })
		errs = append(errs, err)
		for _, t := range swept {
			acts = append(acts, Action{Decision: "removed the lock table " + t + " of a dead agent"})
		}
	}
	return acts, errors.Join(errs...)
}

func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

func recoverSource(ctx context.Context, o Options, r *journal.Record) (string, error) {
	// From "switching" on, the address may have moved, and from "switched"
	// on Commit may have been sent (the source writes no record between the
	// switch and Commit: that write would lengthen every freeze); the
	// target may hold the address: only the target knows, so it is asked.
	// Committed: the connections are its. Aborted or unknown: it has let go
	// of the address, which is claimed back (Released), and the connections
	// come back. Preparing: it still waits for a Commit that will not come,
	// and aborts when it notices the source is gone.
	switch r.State {
	case source.StateSwitching.String(), source.StateSwitched.String(), source.StateCommitting.String(), source.StateInDoubt.String():
		st, err := query(ctx, o, r)
		if err != nil {
			return "in doubt: the target could not be asked; run recover again with its TLS flags", err
		}
		switch st {
		case transport.StateCommitted:
			return finishCommit(o, r)
		case transport.StatePreparing:
			return "in doubt: the target is still deciding (and may hold the address); run recover again in a few seconds", errors.New("recovery: target still preparing")
		}
	}
	return rollBack(o, r)
}

func query(ctx context.Context, o Options, r *journal.Record) (transport.MigrationState, error) {
	if o.Transport == nil || r.Peer == "" {
		return 0, errors.New("recovery: no target address or TLS configuration to ask with")
	}
	id, err := transport.ParseMigrationID(r.Migration)
	if err != nil {
		return 0, err
	}
	return source.Query(ctx, r.Peer, o.Transport, id)
}

// finishCommit ends a committed migration on the source: the old owner's
// copies (in repair mode, so silent) die with it, then its locks go (kept
// until then: the owner's descriptors must not outlive them).
func finishCommit(o Options, r *journal.Record) (string, error) {
	if o.DryRun {
		return "committed at the target: would kill the frozen owner", nil
	}
	// The locks' namespace is named through the owner (/proc/PID/ns/net):
	// it is opened while the owner lives.
	ns, done := lockNS(r)
	defer done()
	if r.Freeze != nil {
		// KillRecord returns once the owner has exited (or if its pid names
		// another process now: the owner is gone all the same).
		if err := freeze.KillRecord(*r.Freeze); err != nil && !errors.Is(err, freeze.ErrPIDReused) {
			return "committed at the target: the owner could not be killed; its locks stay", fmt.Errorf("recovery: %w", err)
		}
	}
	if err := removeLocks(r, ns); err != nil {
		return "committed at the target: the owner's copies discarded", err
	}
	return "committed at the target: the owner's copies discarded, its locks removed", nil
}

// lockNS opens the network namespace the record's locks live in and
// returns its descriptor (0, the agent's own, when the record names none or
// it cannot be opened: a namespace that is gone took its tables with it)
// and a function that closes it.
func lockNS(r *journal.Record) (ns int, done func()) {
	if r.NetNS == "" {
		return 0, func() {}
	}
	f, err := os.Open(r.NetNS)
	if err != nil {
		return 0, func() {}
	}
	return int(f.Fd()), func() { f.Close() }
}

// removeLocks removes the record's lock tables (the connection lock and,
// if it took listeners, the listener lock) in the namespace ns (lockNS).
// Tables already gone are not an error.
func removeLocks(r *journal.Record, ns int) error {
	if r.Lock == "" && r.ListenLock == "" {
		return nil
	}
	_, err := firewall.Sweep(ns, func(instance string) bool {
		t := firewall.TableName(instance)
		return t != r.Lock && t != r.ListenLock
	})
	return err
}

// rollBack gives the connections back to their owner: repair off on each
// (through a copy of the owner's descriptor), lock removed, owner thawed.
func rollBack(o Options, r *journal.Record) (string, error) {
	if o.DryRun {
		return "not committed: would roll back", nil
	}
	var errs []error
	var claimed []string
	// The address comes back first, so that the window probes of the
	// resumed sockets, and the peer's answers, find this host.
	for _, p := range r.Released {
		if r.Dev == "" {
			continue
		}
		err := addrmove.Claim(context.Background(), addrmove.Config{Prefix: p, Dev: r.Dev})
		errs = append(errs, err)
		if err == nil {
			claimed = append(claimed, p.String())
		}
	}
	// Remove this migration's locks first: leaving repair sends a probe
	// that must reach the peer, and the thawed owner's listeners must get
	// their SYNs again.
	ns, done := lockNS(r)
	errs = append(errs, removeLocks(r, ns))
	done()
	resumed := 0
	if r.PID > 0 && alive(r.PID) {
		for _, c := range r.Conns {
			if c.FD < 0 {
				continue
			}
			files, err := procsock.Dup(r.PID, []int{c.FD})
			if err != nil {
				errs = append(errs, err)
				continue
			}
			fd := int(files[0].Fd())
			if v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR); err == nil && v == 1 {
				s := repair.Snapshot{Family: c.Family, Local: c.Local, Remote: c.Remote}
				s.Options.ReuseAddr = c.ReuseAddr
				switch err := repair.Resume(fd, &s); {
				case errors.Is(err, repair.ErrResumedLive):
					resumed++ // live; only an option could not be put back
					errs = append(errs, err)
				case err != nil:
					errs = append(errs, err)
				default:
					resumed++
				}
			}
			files[0].Close()
		}
	}
	if r.Freeze != nil {
		errs = append(errs, freeze.ThawRecord(*r.Freeze))
	}
	msg := fmt.Sprintf("not committed: rolled back (%d sockets out of repair mode)", resumed)
	if len(claimed) > 0 {
		msg += fmt.Sprintf("; claimed %v back on %s", claimed, r.Dev)
	}
	if len(r.Released) > 0 && r.Dev == "" {
		msg += fmt.Sprintf("; the address %v was released at the switch: claim it back on this host", r.Released)
	}
	return msg, errors.Join(errs...)
}

// recoverTarget: a dead target's restored sockets died with it (closed in
// repair mode: silently); only its lock, and a claimed address, remain.
func recoverTarget(r *journal.Record) (string, error) {
	msg := "target died while " + r.State + ": its restored sockets died with it"
	if len(r.Claimed) > 0 {
		msg += fmt.Sprintf("; it had claimed %v", r.Claimed)
	}
	if r.State == "committed" {
		msg = "committed: nothing to do"
	}
	return msg, nil
}
