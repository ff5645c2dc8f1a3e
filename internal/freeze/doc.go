// Package freeze stops a process from touching its sockets while they are
// being migrated, and lets it go again (or kills it) afterwards: Freeze,
// then Thaw on rollback or Kill on commit.
//
// Freeze uses one of two methods, and Method says which:
//
//   - MethodCgroup, the cgroup v2 freezer (cgroup.freeze), when the process
//     has a cgroup of its own: not the root cgroup, not the caller's
//     cgroup or an ancestor of it (freezing it would freeze the caller), and
//     no other process in it or below it (cgroup.procs of the whole subtree
//     lists only the process). Freeze waits until cgroup.events says
//     "frozen 1". The freezer is invisible to the process and to its
//     parent, and holds threads in the kernel even in uninterruptible
//     sleep.
//   - MethodSignal otherwise: SIGSTOP, sent through a pidfd so that it
//     cannot reach another process that reused the pid, which stops every
//     thread of the process; Freeze waits until every thread's state in
//     /proc/PID/task/*/stat is "T". The parent sees the stop through
//     waitpid(WUNTRACED) and a shell reports the job as stopped.
//
// A process that shares its cgroup with others (a container with several
// processes, a systemd service with helpers) is stopped with SIGSTOP
// alone: the others go on running. Freezing a whole shared cgroup would
// stop processes that were not asked for; a caller that wants it can ask
// for it in a later version. The rule is checked once, just before the
// freeze: a process moved into the cgroup after that is frozen with it.
//
// Invariants:
//
//   - Freeze either returns a *Frozen with the process held still, or an
//     error with the process as it found it (thawed again if Freeze had
//     begun to freeze it).
//   - Freeze never undoes a freeze it did not make: a process that was
//     already stopped, or whose cgroup was already frozen, is reported as
//     Inherited and Thaw leaves it so.
//   - Thaw and Kill are idempotent and end the Frozen: after either, the
//     same call does nothing, Thaw after Kill does nothing, and Kill after
//     Thaw fails with ErrReleased rather than kill a running process.
//   - Waits are bounded by Timeout.
//
// A process stays frozen if the caller dies before Thaw: the kernel keeps a
// cgroup frozen and a process stopped until someone thaws it. The caller
// therefore writes Frozen.Record, plain data, to its journal before it
// goes on, and "tcpmigrate recover" calls ThawRecord with it (KillRecord
// when the process's connections were committed elsewhere). Both check the
// process's start time so that they never signal a process that reused the
// pid.
//
// Errors are *Error values naming the operation and the pid, wrapping the
// kernel's errno or one of the sentinel errors.
package freeze
