// Package source is the source agent of a migration: it acquires sockets,
// freezes their owner, locks and dumps them, streams their snapshots and
// drives the two-phase handoff. Not yet built: see the handoff issue.
package source
