// Package fdpass carries established TCP sockets between the processes of one
// host over a unix stream socket: a cooperating application hands its
// sockets to the source agent (tcpmigrate send --handoff), and the target
// agent delivers restored sockets to a running application (tcpmigrate
// receive --deliver). Each socket travels as a descriptor attached with
// SCM_RIGHTS to a frame that names it, together with its addresses, an
// opaque application-state blob and a connection ID. The frames are
// specified byte by byte in docs/handoff-socket.md.
//
// Invariants:
//
//   - Every size read from the wire is checked against a limit before
//     anything is allocated for it.
//   - Every descriptor received is either returned to the caller inside an
//     Item or closed: a malformed, oversized or truncated frame, a version
//     this side does not speak, descriptors that do not match the frame and
//     descriptors that are not TCP sockets all close what arrived.
//     Descriptors are received with MSG_CMSG_CLOEXEC.
//   - A listener checks the peer's SO_PEERCRED against its Policy before a
//     single byte is exchanged, and tells a refused peer why in an error
//     frame.
//   - After a receive error the connection is unusable (the stream may be
//     out of step, or the peer has given up): every later receive returns
//     the same error and every send fails. After a send error every later
//     send returns it. An error caused by what the peer sent is reported to
//     it in an error frame first.
//
// The package does no logging and keeps no policy beyond the peer check and
// the size limits. Errors are *OpError values naming the operation and
// wrapping a sentinel error of this package, a *PeerError, a *RemoteError
// (the peer's error frame) or the kernel's errno.
package fdpass
