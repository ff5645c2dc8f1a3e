package source

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/journal"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// Conn is one connection handed to the source agent.
type Conn struct {
	// File is a descriptor of the TCP socket. Migrate closes it if the
	// connection is committed; otherwise it is the caller's again. Other
	// descriptors of the same socket (the owning process's) must not be
	// used until Migrate returns, or with Config.Pause from the return of
	// Pause on.
	File *os.File
	// AppState is an opaque blob that travels with the connection to the
	// target's application (for example a protocol parser's state).
	AppState []byte
	// OwnerFD is the socket's descriptor number in the process that owns
	// it (send --pid), recorded in the journal for recovery. It means
	// something only when the journal names the owner (see Annotate).
	OwnerFD int
}

// Config configures one migration.
type Config struct {
	// To is the target agent's address, "host:port".
	To string
	// Transport configures the link (TLS, limits, capabilities).
	Transport *transport.Config
	// NetNS is a descriptor of the network namespace the sockets and the
	// lock live in; 0 means the calling thread's namespace.
	NetNS int
	// Lease bounds how long either side's locks outlive a silent agent.
	// Zero means DefaultLease.
	Lease time.Duration
	// NoHold turns off the zero-window hold (docs/handoff.md): without it
	// the lock simply drops what the peers send during the freeze, and a
	// peer that was sending waits for its retransmission timer (at least
	// 200 ms on Linux) after the unlock. The hold is used when this is
	// false, the target advertises repair.FeatHeldRestore and this kernel
	// accepts the hold's nftables rule.
	NoHold bool
	// NoPrecopy turns off the pre-copies (docs/handoff.md): without them
	// every connection is captured after the lock, inside the freeze.
	// With them (a held connection, a target of protocol version 3) a
	// connection is captured once its peer is held and drained, before the
	// lock, and the target restores it then; after the lock one TCP_INFO
	// read shows whether anything moved since, and only then is it
	// captured again.
	NoPrecopy bool
	// QuietFor is how long a connection must have carried no data, either
	// way, to be pre-copied; the others are paused, held and locked in a
	// second wave, just before the freeze (docs/handoff.md). Zero means
	// DefaultQuietFor; a negative value makes every ESTABLISHED
	// connection quiet.
	QuietFor time.Duration
	// HoldDrain bounds the wait, before the lock, for held peers to stop
	// sending. Zero means DefaultHoldDrain.
	HoldDrain time.Duration
	// Timeout bounds each wait for the target (verdicts, switch, commit).
	// Zero means DefaultTimeout.
	Timeout time.Duration
	// Switch moves the network identity (releases the service address, or
	// runs the operator's hook) once every connection is prepared. An error
	// aborts the migration; Unswitch is then called to undo it.
	Switch func(ctx context.Context) error
	// Unswitch gives the network identity back after an abort that came
	// after Switch. It may be nil.
	Unswitch func(ctx context.Context) error
	// Listeners are listening sockets that move with the connections
	// (listeners.go): recreated on the target, their accept queues taken
	// and migrated as pending connections.
	Listeners []Listener
	// SwitchAddrs are the addresses the target should claim at the switch
	// (sent in the Switch message). Empty when a hook moves them.
	SwitchAddrs []netip.Prefix
	// Pause, if set, makes the hand-over live: the owner of the connections
	// still serves them when Migrate is called, and Migrate inspects them
	// and prepares the target meanwhile. Before it holds and locks them it
	// calls Pause, with the indices (into the conns of Migrate) of the
	// connections it is about to lock: never those it took from the
	// accept queues of Listeners, which the owner never had (and no call
	// if none of the conns is left). With PauseWaves and pre-copies it may
	// call it twice, for the quiet connections and then, once those are
	// copied and locked (tens to hundreds of milliseconds later), for the
	// busy ones, each index once (docs/handoff.md, "Waves and
	// pre-copies"). When Pause returns nil the owner
	// no longer touches those. Migrate then inspects them again, since the
	// owner may have changed their options, shut them down or seen them
	// closed by the peer, and goes on to the hold. An error from Pause, or
	// a connection that cannot be migrated any more at the second look,
	// rolls the whole migration back. Connections that are not named stay
	// the owner's throughout. Pause returns the owner's state of each named
	// connection as of the pause, in the order of conns, which replaces its
	// Conn.AppState (nil states leave every AppState as it was). Without
	// Pause the owner must be done with the connections before Migrate is
	// called.
	Pause func(ctx context.Context, conns []int) (states [][]byte, err error)
	// PauseWaves says that Pause may be called twice (the waves of
	// pre-copies). Without it a migration with Pause runs in one wave,
	// and pre-copies only when every connection is quiet.
	PauseWaves bool
	// BeforeRelease runs after the commit, once the source copies are
	// discarded and before the source lock is removed: the place to kill
	// the old owner, whose remaining descriptors must not outlive the lock.
	BeforeRelease func() error
	// JournalDir is where the source keeps its journal ("" = the default).
	JournalDir string
	// Annotate, if set, adds what the caller knows (the owning process and
	// its freeze) to the journal record before it is first written.
	Annotate func(*journal.Record)
	// Log receives structured logs; nil discards them.
	Log *slog.Logger
	// Progress, if set, is called as connections are captured: once per
	// connection, inside the freeze, from the capturing goroutines (so
	// possibly concurrently). It must return at once.
	Progress func(done, total int)
	// Fault, for tests: called at each Step; a non-nil error makes that
	// step fail as if the operation had failed.
	Fault func(Step) error
}

// Defaults.
const (
	DefaultLease   = 10 * time.Second
	DefaultTimeout = 30 * time.Second
)

// ConnResult is what became of one connection.
type ConnResult struct {
	Index         uint32
	Local, Remote netip.AddrPort
	Outcome       Outcome
	// Freeze is how long the connection was frozen: from the source lock
	// until the target resumed it (committed) or the source resumed it
	// (rolled back). For a committed connection the end is the target's
	// report placed on this host's clock by halving the round trip of
	// COMMIT (transport.Committed.Freezes); from a target that does not
	// report it, the end is the arrival of COMMITTED, which also counts
	// the target's delivery and the way back.
	Freeze time.Duration
	Err    error
	// PendingOn is, for a connection taken from a listener's accept queue,
	// that listener's address.
	PendingOn netip.AddrPort
}

// Phase is a named part of the migration and how long it took.
type Phase struct {
	Name     string
	Duration time.Duration
}

// Result reports a migration.
type Result struct {
	Migration transport.MigrationID
	State     State
	Conns     []ConnResult
	// Listeners reports the listening sockets of Config.Listeners.
	Listeners []ListenerResult
	Phases    []Phase
	// RawBytes is the queued connection data moved; WireBytes what crossed
	// the link (both directions, compressed and framed).
	RawBytes, WireBytes int64
	// Held is how many connections were held with a zero window before the
	// lock (Config.NoHold).
	Held int
	// Precopied is how many connections were captured before the lock
	// (Config.NoPrecopy), and Confirmed how many of those copies still
	// stood after it: the others were captured again inside the freeze.
	Precopied, Confirmed int
}

// Committed reports whether every connection was committed.
func (r *Result) Committed() bool {
	for _, c := range r.Conns {
		if c.Outcome != Committed {
			return false
		}
	}
	for _, l := range r.Listeners {
		if l.Outcome != Committed {
			return false
		}
	}
	return len(r.Conns) > 0 || len(r.Listeners) > 0
}
