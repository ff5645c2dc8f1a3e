// Package procsock finds the TCP sockets a process holds and takes copies of
// their descriptors: the process side of "tcpmigrate send --pid" and
// "tcpmigrate list --pid".
//
// List walks /proc/PID/fd and matches the socket inodes it finds with a
// NETLINK_SOCK_DIAG dump taken inside the process's network namespace, so
// every socket is reported with its addresses, its TCP state and a Verdict:
// whether send --pid would take it and, if not, why. Filter narrows the
// selection to local ports; Inspect asks the repair package about the
// sockets that are left. Dup and DupSockets copy descriptors into the calling
// process with pidfd_getfd(2).
//
// Invariants:
//
//   - List and Filter only look: they change nothing in the process or its
//     sockets. Inspect changes nothing either (repair.Inspect is read-only).
//   - A Socket is plain data: a snapshot of what /proc and sock_diag said
//     when List ran. Descriptors can change afterwards until the process is
//     frozen; DupSockets checks that each descriptor still refers to the
//     listed socket.
//   - Every error path closes the descriptors this package opened, and every
//     OS thread that entered another network namespace either comes back or
//     is terminated with its goroutine: none is ever reused in the wrong
//     namespace.
//
// The caller needs CAP_SYS_PTRACE over the process (or the same user and a
// permissive ptrace scope) for Dup, and CAP_SYS_ADMIN to enter another
// network namespace. Errors are *Error values naming the operation, the pid
// and, where there is one, the descriptor.
package procsock
