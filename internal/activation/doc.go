// Package activation starts a program with sockets inherited the way
// systemd socket activation passes them (sd_listen_fds(3)), and reads them
// back in a Go program started that way.
//
// The convention: the sockets are descriptors 3, 4, … in order, and the
// environment holds LISTEN_FDS (their number), LISTEN_PID (the pid of the
// process they are meant for, so that a child that inherits the environment
// ignores them) and LISTEN_FDNAMES (their names joined by ':').
//
// Invariants:
//
//   - LISTEN_PID is the started program's own pid. A parent cannot know it
//     before fork, so Command runs the program through a constant /bin/sh
//     script that sets LISTEN_PID=$$ and execs it: the program and its
//     arguments are the script's positional parameters and never parsed by
//     the shell.
//   - The inherited descriptors are in blocking mode, as systemd passes them
//     and as most programs (socat, inetd-style servers) expect. Blocking mode
//     belongs to the open file description, which the parent shares until it
//     closes its copies: it should close them once the program has started.
//   - Names produced by Name contain only [A-Za-z0-9._-], are at most 255
//     bytes and decode back to the exact addresses (IPv6 zones and
//     IPv4-mapped addresses included); see Name for the grammar.
//
// Errors are prefixed with "activation:" and wrap ErrInvalid, ErrName or
// ErrEnv, or the underlying error.
package activation
