package firewall

import (
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// The zero-window hold (REPAIR-NOTES 10.3, 10.4). Before the freeze, the
// source holds its connections: every segment a held tuple sends carries a
// TCP window of 0, so the peer stops sending and waits in zero-window
// persist mode, while input stays open so that what the peer already sent
// still arrives. Lock then moves the tuples from the hold sets to the lock
// sets in one batch. A peer that meets the lock with nothing in flight
// loses nothing to it, and never enters retransmission backoff.

// holdUndo is the state of one entry of holds before the current call.
type holdUndo struct {
	c        conn
	deadline time.Time
}

// holdSets returns the hold sets h4 and h6 of table.
func holdSets(table *nftables.Table, lease time.Duration) []*nftables.Set {
	return []*nftables.Set{
		{Table: table, Name: holdV4, ID: 3, KeyType: keyType4, HasTimeout: true, Timeout: lease, Concatenation: true},
		{Table: table, Name: holdV6, ID: 4, KeyType: keyType6, HasTimeout: true, Timeout: lease, Concatenation: true},
	}
}

// holdRule is "meta nfproto F meta l4proto tcp
// ip[6] saddr . tcp sport . ip[6] daddr . tcp dport @h4|h6 tcp window set 0":
// a payload write of the 16-bit window field (transport header offset 14)
// with an update of the TCP checksum at offset 16. Locally generated
// segments whose checksum is left to the device (CHECKSUM_PARTIAL) get no
// update, which the kernel decides on its own.
func holdRule(s *nftables.Set) []expr.Any {
	return append(lookupExprs(s, fromLocal),
		&expr.Immediate{Register: 1, Data: []byte{0, 0}},
		&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: 1, Base: expr.PayloadBaseTransportHeader,
			Offset: 14, Len: 2, CsumType: expr.CsumTypeInet, CsumOffset: 16},
	)
}

// CanHold reports whether the lock has the zero-window hold: Config.Hold was
// set and the kernel accepted the rule.
func (l *Lock) CanHold() bool { return l.canHold }

// Hold makes every segment that each tuple's local end sends advertise a
// window of 0, from the moment the batch commits; packets toward the local
// end still pass. Lock and Unlock end the hold of the tuples they name, in
// their own batch, so that a held connection goes from held to locked at
// one instant. A hold has the lock's lease and is not renewed: it is meant
// to last milliseconds. The lock must have been made with Config.Hold, and
// the kernel must have accepted it (CanHold); otherwise Hold fails with
// ErrNoHold. Holding a tuple that is already held or locked is harmless.
func (l *Lock) Hold(ts []Tuple) error {
	cs, err := collect("hold", l.table, ts)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return &Error{Op: "hold", Table: l.table, Err: ErrClosed}
	}
	if l.released {
		return &Error{Op: "hold", Table: l.table, Err: ErrReleased}
	}
	if !l.canHold {
		return &Error{Op: "hold", Table: l.table, Err: ErrNoHold}
	}
	start := l.startCall()
	if l.holds == nil {
		l.holds = make(map[conn]time.Time, len(cs))
	}
	l.tx.holdAdd.reserve(cs)
	l.holdUndo = slices.Grow(l.holdUndo, len(cs))
	for _, c := range cs {
		// Adding what the set holds is a no-op that keeps its timeout, so a
		// tuple held already keeps its deadline unless it surely lapsed.
		l.tx.holdAdd.put(c)
		d, ok := l.holds[c]
		if ok && start.Sub(d) <= leaseMargin {
			continue
		}
		l.holdUndo = append(l.holdUndo, holdUndo{c, d})
		l.holds[c] = start.Add(l.cfg.Lease)
	}
	return l.commit("hold")
}

// unheld puts the removal of the holds of cs, at now, in the batch being
// built and drops them from holds, recording how to undo that. It runs
// with l.mu held, before the batch is sent.
func (l *Lock) unheld(cs []conn, now time.Time) {
	if len(l.holds) == 0 {
		return
	}
	for _, c := range cs {
		d, ok := l.holds[c]
		if !ok {
			continue // not held, or named twice
		}
		l.holdUndo = append(l.holdUndo, holdUndo{c, d})
		delete(l.holds, c)
		if d.Sub(now) <= leaseMargin {
			// The kernel may have expired it: add it first so that the
			// delete cannot fail with ENOENT.
			l.tx.holdGuard.put(c)
		}
		l.tx.holdDel.put(c)
	}
}

// restoreHolds puts holds back as it was before the call whose batch
// failed. It runs with l.mu held.
func (l *Lock) restoreHolds() {
	for i := len(l.holdUndo) - 1; i >= 0; i-- {
		u := l.holdUndo[i]
		if u.deadline.IsZero() { // it was not held
			delete(l.holds, u.c)
		} else {
			l.holds[u.c] = u.deadline
		}
	}
}
