// Package bench is the benchmark behind `tcpmigrate bench`, the one that
// proves (or disproves) the performance figures of docs/performance.md.
//
// Run builds a lab of network namespaces (a peer, a source host and a
// target host on a bridge), opens connections from the peer to a workload
// on the source, optionally with bytes queued each way and with some peers
// streaming during the move, migrates them in one run of the source and
// target agents, and returns a Report: the freeze of each connection, the
// phases of the migration, the stall the streaming peers saw, the
// per-connection cost of a dump and a restore beside the bare syscall floor,
// the bytes moved and the peak memory of each agent.
//
// Every agent and the peer run in processes of their own: this program
// re-executed in child mode (ChildMain) inside its host's namespace. The
// source agent and the target agent each get a process so that the peak
// resident memory reported for each is its own; the peer gets one so that
// no process holds more descriptors than the machine allows (one end of
// every connection each). The bench process plays the workload: it hands
// its sockets to the source agent over the handoff socket, as `send
// --handoff` takes them, and the target agent delivers them back to it over
// another, as `receive --deliver` does, where the workload carries on.
//
// Invariants: nothing is added to the root namespace's interfaces or
// firewall; the lab and every child are gone when Run returns; a Report
// carries every error met, and nothing in it is asserted against a time.
package bench
