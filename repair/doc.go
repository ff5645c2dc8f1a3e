// Package repair is the kernel interface of one TCP socket under TCP_REPAIR:
// it dumps an established connection into a Snapshot and rebuilds a socket
// from one. It is the Go counterpart of CRIU's libsoccr.
//
// The package has a handful of verbs, used in this order:
//
//	source:  Inspect → (lock the 4-tuple) → Capture → …
//	         → Discard (commit) or Resume (roll back)
//	target:  ReadDefaults, NewBlank, Restorer.Preset → (lock the 4-tuple) →
//	         Restorer.RestoreBlank or Restorer.Restore → Restorer.Settle →
//	         (unlock) → Restorer.Resume, or Restorer.Wake then Finish
//	         (commit), or Discard (abort)
//
// Inspect refuses what cannot move and reads the ordinary options; it runs
// before the lock, and an Inspector runs it for many sockets with one
// sock_diag dump. Capture is the part inside the freeze; Dump is Inspect
// then Capture. On the target, what depends only on the local address is
// done before the lock: ReadDefaults reads the options of a new socket,
// which a Restorer with Defaults does not write again, and NewBlank makes
// the socket, bound, that RestoreBlank finishes inside the freeze (Restore
// makes its own). Resume alone serves either side.
//
// The zero-window hold keeps the peers quiet during the freeze: on the
// source Announce and Drain before the lock and MarkHeld after Capture, on
// the target ResumeHeld and Kick (Restorer.Resume does both). Listening
// sockets move with DescribeListener, PortHeld and Listen, and Probe tells
// what the running kernel offers.
//
// Besides ESTABLISHED, the dump takes SYN_SENT and the half-closed states
// (State.Migratable). Restoring those in which a FIN was received or ours
// acknowledged needs segments crafted as if from the peer: a Restorer with
// an Injector sends them, and its Settle sends those that had to wait for
// the local address to be on this host.
//
// Invariants:
//
//   - Dump requires that the caller has already blocked every packet of the
//     connection in both directions (the firewall lock). Without it the queues
//     change under the dump and the Snapshot is wrong; Dump detects most such
//     races by re-reading the counters and fails rather than return bad data.
//   - A Snapshot is single-use: once the source socket has been resumed, a
//     Snapshot taken from it is stale and restoring it would create a second
//     endpoint with old sequence numbers.
//   - A socket returned by Restore is still in repair mode; nothing it does
//     reaches the peer until Resume. Discard closes a socket in repair mode,
//     which the kernel does silently: no FIN, no RST.
//   - Every error path closes the descriptors this package opened and leaves
//     no socket it created in repair mode.
//
// Beyond the socket itself, the package's only network I/O is the
// segments an Injector crafts (through its raw sockets) and its sock_diag
// requests over netlink; it keeps no policy and does not log. Errors are *OpError values naming the operation and the
// connection, wrapping the kernel's errno or one of the sentinel errors.
package repair
