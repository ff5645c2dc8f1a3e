// Package transport is the link between a source and a target agent: one
// TCP connection per migration, mutually authenticated TLS 1.3, a yamux
// session on top, a versioned handshake, and the wire codec of the handoff
// messages and of the snapshots, compressed with zstd. It knows nothing of
// the sockets being migrated beyond the repair.Snapshot type.
//
// A link has one control stream, which carries the typed messages of the
// two-phase handoff in order (Link.Control), and any number of snapshot
// streams, which carry (index, snapshot) records in parallel, so that a
// connection with megabytes queued does not hold up thousands of small ones
// (Link.OpenSnapshotStream, Link.AcceptSnapshotStream). The wire format is
// written down in docs/protocol.md.
//
// Invariants:
//
//   - Plaintext is never a default: a Config without TLS fails unless it
//     sets Insecure, a TLS side refuses a plaintext peer and the reverse,
//     each with a clear error, and a TLS server always requires and verifies
//     a client certificate.
//   - Incompatibility (magic, version, a missing required kernel feature) is
//     an error on both sides during the handshake, before anything is frozen.
//     The handshake runs under a deadline: it fails, it does not hang.
//   - Every length read from the wire is checked against a limit before
//     anything is allocated for it, and large bodies are allocated as their
//     bytes arrive. A value over a limit is a *LimitError naming the limit;
//     malformed input is an error matching ErrMalformed, never a panic.
//   - A decoder skips fields it does not know and frames of unknown ancillary
//     types (0x80 and up): a newer peer can add both.
//   - A dead peer is noticed within about KeepAliveInterval +
//     KeepAliveTimeout, and every blocked call on the link then returns.
//   - No goroutine outlives its Link: Close (or the loss of the peer) ends
//     yamux's and those of the snapshot writers (one each, sending while the
//     caller encodes); zstd runs with concurrency 1 and none of its own.
//   - A snapshot stream's zstd decoder holds at most MaxChunk bytes: bodies
//     travel in chunks of at most 128 KiB, each compressed on its own.
//
// Errors are *OpError values ("transport: <operation>: <reason>") that wrap
// the sentinel errors of this package, a *LimitError or a *HandshakeError;
// test them with errors.Is and errors.As.
package transport
