// Package target is the target agent of a migration. A Server accepts links
// from source agents and, for each migration, follows the target's side of
// the two-phase handoff of docs/handoff.md: it checks every snapshot
// against its policy, locks the connection's 4-tuple, restores the socket in
// repair mode and answers with a verdict per connection; at the switch it
// claims the network identity; on commit it unlocks, resumes and delivers
// the sockets to the application (a Go callback, a program started with
// the sockets as inherited descriptors, or a program listening on a unix
// socket), and records the outcome so that an in-doubt source can ask.
//
// Invariants: no socket is created for a connection whose local address is
// outside the allow-list; a restored socket stays locked and in repair mode
// until Commit, and is discarded silently on Abort, on a lost link and when
// the lease runs out; once Commit has been received the target finishes
// the commit whatever happens to the link.
package target
