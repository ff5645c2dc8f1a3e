// Package target is the target agent of a migration: it accepts links,
// authorises, locks and restores connections, votes, commits and delivers
// the sockets. Not yet built: see the handoff issue.
package target
