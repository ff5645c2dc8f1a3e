// Package source is the source agent of a migration. Given sockets (from a
// process with pidfd_getfd, from a cooperating program over a unix socket,
// or from a Go program through this API), Migrate drives the two-phase
// handoff of docs/handoff.md: it inspects each connection, locks them all
// in one firewall batch, captures them with TCP_REPAIR and streams their
// snapshots to the target agent, rolls back what the target refuses, moves
// the network identity at the switch, commits, and finally closes its
// copies silently.
//
// Invariants: until Commit is sent, any failure rolls every connection back
// (unlocked, out of repair mode, options put back), so the peer sees only a
// pause; after Commit is sent and before Committed arrives the migration is
// in doubt, and the source neither rolls back nor discards until the target
// says which way it went. The source's locks carry a lease that Migrate
// renews while it runs.
package source
