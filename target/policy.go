package target

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// Sentinel errors of the target's policy. A connection or a migration the
// policy refuses fails with an error wrapping one of these (or
// repair.ErrInvalidSnapshot); callers test with errors.Is.
var (
	// ErrNotAllowed means a connection's local address or port is not in
	// the allow-list, or it asks for something the target never grants
	// (such as the firewall's bypass mark).
	ErrNotAllowed = errors.New("target: refused by policy")
	// ErrOverLimit means a connection or a migration exceeds a limit of
	// the Policy (connections, queue bytes, bytes, streams).
	ErrOverLimit = errors.New("target: over a policy limit")
	// ErrUnsupported means this kernel lacks a feature the connection
	// needs to be rebuilt faithfully.
	ErrUnsupported = errors.New("target: this kernel cannot rebuild the connection")
	// ErrConflict means two connections of one migration carry the same
	// 4-tuple.
	ErrConflict = errors.New("target: 4-tuple carried twice")
	// ErrRole means the peer's certificate does not name the source role
	// (tcpmigrate:role=source).
	ErrRole = errors.New("target: the peer's certificate does not name the source role")
	// ErrReused means a Prepare named a migration ID the target already
	// knows: an ID is used once, so that the recorded outcome of a
	// migration can never be overwritten.
	ErrReused = errors.New("target: migration ID already used")
	// ErrTimeout means the source did not finish a phase in time.
	ErrTimeout = errors.New("target: the source took too long")
	// ErrBusy means the target already serves Policy.MaxLinks links.
	ErrBusy = errors.New("target: too many links at once")
)

// Defaults of the Policy's zero members.
const (
	// DefaultMaxConnections bounds the connections of one migration.
	DefaultMaxConnections = 65536
	// DefaultMaxQueueBytes bounds one connection's queues and state.
	DefaultMaxQueueBytes = 64 << 20
	// DefaultMaxBytes bounds the queues and states of one migration.
	DefaultMaxBytes = 4 << 30
	// DefaultPrepareTimeout bounds the prepare phase of a migration.
	DefaultPrepareTimeout = 2 * time.Minute
	// DefaultCommitTimeout bounds the wait from Prepared to Commit.
	DefaultCommitTimeout = 2 * time.Minute
	// DefaultMaxLinks bounds the links ServeListener serves at once.
	DefaultMaxLinks = 64
)

const (
	// maxStreams bounds the snapshot streams of one migration (the source
	// agent opens two).
	maxStreams = 16
	// bufferedBytes bounds the queue bytes a migration holds between
	// their arrival and their restore (or refusal); a reader of a snapshot
	// stream waits for room before it hands a record on.
	bufferedBytes = 128 << 20
)

// Policy says what a target accepts from its sources. Every check on a
// connection runs before anything is locked or created for it. The zero
// Policy is usable: it allows no local address (Config.Allow adds some),
// any port, the Default… limits, and only peers whose certificate names
// the source role.
type Policy struct {
	// Allow lists the local address ranges connections may be restored
	// for. Config.Allow adds to it; with both empty, every connection is
	// refused.
	Allow []netip.Prefix
	// AllowPorts lists the local ports connections may be restored for;
	// empty allows any port.
	AllowPorts []uint16
	// MaxConnections bounds the number of connections of one migration: a
	// Prepare announcing more is refused as a whole (Abort, code policy),
	// before anything is allocated for them. Zero means
	// DefaultMaxConnections.
	MaxConnections uint32
	// MaxQueueBytes bounds one connection's receive and send queues plus
	// its application state; a larger connection gets VerdictLimit. Zero
	// means DefaultMaxQueueBytes.
	MaxQueueBytes uint64
	// MaxBytes bounds the same sum over all connections of a migration;
	// the connections that would exceed it get VerdictLimit. Zero means
	// DefaultMaxBytes.
	MaxBytes uint64
	// PrepareTimeout bounds the prepare phase, from Prepare until the last
	// snapshot has arrived and been answered: a source that streams for
	// ever, or never finishes a stream, is aborted (code timeout). Zero
	// means DefaultPrepareTimeout.
	PrepareTimeout time.Duration
	// CommitTimeout bounds the wait from Prepared to Commit, the switch
	// included. Zero means DefaultCommitTimeout.
	CommitTimeout time.Duration
	// MaxLinks bounds the links ServeListener serves at once, handshakes
	// included; a connection beyond it is closed at once. Zero means
	// DefaultMaxLinks.
	MaxLinks int
	// AnyCertificate accepts a peer whose certificate, though signed by a
	// trusted CA, does not name the source role (certificates minted by
	// other tools). Leave it false when the CA signs anything else.
	AnyCertificate bool
}

// withDefaults returns p with its zero limits set to the defaults.
func (p *Policy) withDefaults() Policy {
	q := *p
	if q.MaxConnections == 0 {
		q.MaxConnections = DefaultMaxConnections
	}
	if q.MaxQueueBytes == 0 {
		q.MaxQueueBytes = DefaultMaxQueueBytes
	}
	if q.MaxBytes == 0 {
		q.MaxBytes = DefaultMaxBytes
	}
	if q.PrepareTimeout <= 0 {
		q.PrepareTimeout = DefaultPrepareTimeout
	}
	if q.CommitTimeout <= 0 {
		q.CommitTimeout = DefaultCommitTimeout
	}
	if q.MaxLinks <= 0 {
		q.MaxLinks = DefaultMaxLinks
	}
	return q
}

// Refusal is a connection the target refused before creating anything for
// it: the verdict code the source is sent, and why.
type Refusal struct {
	// Code is the verdict: VerdictInvalid, VerdictUnsupported,
	// VerdictRefused, VerdictLimit or VerdictConflict.
	Code transport.VerdictCode
	// Err says why; it wraps a sentinel error of this package or
	// repair.ErrInvalidSnapshot.
	Err error
}

// Error returns the reason.
func (r *Refusal) Error() string { return r.Err.Error() }

// Unwrap returns the reason.
func (r *Refusal) Unwrap() error { return r.Err }

// Check decides whether the policy lets the target rebuild the connection s
// (with appState, its application state) on a kernel with the features
// have, looking at the connection alone: the limits that span a migration
// are checked by the Server. It returns nil or a *Refusal, in this order:
// an inconsistent snapshot (repair's Validate and the further checks of
// this package) is VerdictInvalid; one that needs a kernel feature have
// lacks is VerdictUnsupported (have zero means unknown: not checked); a
// local address or port outside the allow-lists, or the firewall's bypass
// mark, is VerdictRefused; queues over MaxQueueBytes are VerdictLimit.
func (p *Policy) Check(s *repair.Snapshot, appState []byte, have repair.Features) error {
	q := p.withDefaults()
	return q.check(s, appState, have)
}

func (p *Policy) check(s *repair.Snapshot, appState []byte, have repair.Features) error {
	if err := s.Validate(); err != nil {
		return &Refusal{Code: transport.VerdictInvalid, Err: err}
	}
	if err := consistent(s); err != nil {
		return &Refusal{Code: transport.VerdictInvalid, Err: err}
	}
	if missing := needs(s) &^ have; have != 0 && missing != 0 {
		return &Refusal{Code: transport.VerdictUnsupported,
			Err: fmt.Errorf("%w: %s needs kernel features this host lacks: %s", ErrUnsupported, tupleOf(s), missing)}
	}
	local, _ := s.Tuple()
	if !p.allowedAddr(local.Addr()) {
		return &Refusal{Code: transport.VerdictRefused,
			Err: fmt.Errorf("%w: local address %s is not in the allow-list", ErrNotAllowed, local.Addr())}
	}
	if len(p.AllowPorts) > 0 && !slices.Contains(p.AllowPorts, local.Port()) {
		return &Refusal{Code: transport.VerdictRefused,
			Err: fmt.Errorf("%w: local port %d is not in the allowed ports", ErrNotAllowed, local.Port())}
	}
	if s.Options.Mark == firewall.DefaultBypassMark {
		return &Refusal{Code: transport.VerdictRefused,
			Err: fmt.Errorf("%w: %s: socket mark %#x is the connection lock's bypass mark", ErrNotAllowed, tupleOf(s), s.Options.Mark)}
	}
	if n := queueBytes(s, appState); n > p.MaxQueueBytes {
		return &Refusal{Code: transport.VerdictLimit,
			Err: fmt.Errorf("%w: %s carries %d bytes of queues and state, over the limit of %d per connection", ErrOverLimit, tupleOf(s), n, p.MaxQueueBytes)}
	}
	return nil
}

func (p *Policy) allowedAddr(a netip.Addr) bool {
	for _, pr := range p.Allow {
		if pr.Contains(a) {
			return true
		}
	}
	return false
}

func tupleOf(s *repair.Snapshot) string { return s.Local.String() + " " + s.Remote.String() }

// queueBytes is what a connection costs the target in memory until its
// restore: its queues and its application state.
func queueBytes(s *repair.Snapshot, appState []byte) uint64 {
	return uint64(len(s.RecvQueue)) + uint64(len(s.SendQueue)) + uint64(len(appState))
}

// needs returns the kernel features the target needs to rebuild s as it
// was: without them the restore would fail half-way, or, worse, succeed
// with a connection that behaves differently (a timestamp clock in the
// wrong unit breaks PAWS at the peer).
func needs(s *repair.Snapshot) repair.Features {
	f := repair.FeatRepair
	if s.Flags&repair.FlagWindow != 0 {
		f |= repair.FeatRepairWindow
	}
	if s.Flags&repair.FlagTimestamps != 0 {
		f |= repair.FeatTimestamp
	}
	if s.Flags&repair.FlagUsecTS != 0 {
		f |= repair.FeatUsecTS
	}
	if s.Options.Mask&repair.OptBufLock != 0 {
		f |= repair.FeatBufLock
	}
	if s.State == repair.StateSynSent {
		f |= repair.FeatTimestamp // the SYN's clock goes on
	}
	if s.State.HalfClosed() {
		f |= repair.FeatHalfClosed
	}
	if s.State.NeedsInjection() {
		f |= repair.FeatRawInject | repair.FeatMark
	}
	if s.Flags&repair.FlagHeld != 0 {
		f |= repair.FeatHeldRestore
	}
	return f
}

// Kernel bounds of option values (include/net/tcp.h, include/uapi/linux/if.h).
const (
	maxIfName   = 15    // IFNAMSIZ-1: the longest interface name (and IPv6 zone)
	maxKeepIdle = 32767 // MAX_TCP_KEEPIDLE, also MAX_TCP_KEEPINTVL
	maxKeepCnt  = 127   // MAX_TCP_KEEPCNT
)

// consistent adds to repair's Validate the checks a snapshot from an
// untrusted source needs: addresses that can be the two ends of a TCP
// connection of this host, and windows the negotiated scales can express.
func consistent(s *repair.Snapshot) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", repair.ErrInvalidSnapshot, tupleOf(s), fmt.Sprintf(format, args...))
	}
	local, remote := s.Tuple()
	la, ra := local.Addr(), remote.Addr()
	if local == remote {
		return bad("a connection to itself")
	}
	for _, a := range []netip.Addr{la, ra} {
		if z := a.Zone(); z != "" && (!a.IsLinkLocalUnicast() || len(z) > maxIfName) {
			return bad("zone %q on an address that cannot have one", z)
		}
		if a.Is4() && (a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || a.As4()[0] == 0) {
			return bad("address %s cannot be an end of a TCP connection", a)
		}
	}
	if la.IsMulticast() {
		return bad("multicast local address")
	}
	if la.IsLoopback() != ra.IsLoopback() {
		return bad("one end on loopback and the other not")
	}
	// Options the kernel would refuse: the restore would fail with a
	// socket already made. (Values read from a real socket are in range.)
	o := &s.Options
	if o.KeepIdle < 1 || o.KeepIdle > maxKeepIdle || o.KeepIntvl < 1 || o.KeepIntvl > maxKeepIdle ||
		o.KeepCnt < 1 || o.KeepCnt > maxKeepCnt {
		return bad("keepalive %d/%d/%d out of range", o.KeepIdle, o.KeepIntvl, o.KeepCnt)
	}
	if o.TTL < 1 || o.TTL > 255 {
		return bad("TTL %d out of range", o.TTL)
	}
	// The peer advertises at most 65535 << snd_wscale bytes; the largest
	// window it ever offered cannot be more.
	maxSnd := uint64(65535) << s.SndWScale
	if uint64(s.Window.SndWnd) > maxSnd || uint64(s.Window.MaxWindow) > maxSnd {
		return bad("snd_wnd %d / max_window %d over what scale %d can advertise", s.Window.SndWnd, s.Window.MaxWindow, s.SndWScale)
	}
	return nil
}

// admission applies the policy to the connections of one migration, one
// at a time, in the order of the batches: the per-connection Check, then
// the limits that span the migration. It also holds the migration's
// buffer budget. admit is called from one goroutine; the budget from many.
type admission struct {
	pol    *Policy // with defaults
	feats  repair.Features
	bytes  uint64                    // queue bytes of the connections admitted
	tuples map[firewall.Tuple]uint32 // admitted tuples → index
	buf    budget
}

func newAdmission(pol *Policy, feats repair.Features) *admission {
	a := &admission{pol: pol, feats: feats, tuples: map[firewall.Tuple]uint32{}}
	a.buf.init(bufferedBytes)
	return a
}

// admit returns nil if connection index may be locked and restored, else
// a *Refusal.
func (a *admission) admit(index uint32, s *repair.Snapshot, appState []byte) error {
	if err := a.pol.check(s, appState, a.feats); err != nil {
		return err
	}
	n := queueBytes(s, appState)
	if a.bytes+n > a.pol.MaxBytes {
		return &Refusal{Code: transport.VerdictLimit,
			Err: fmt.Errorf("%w: %s would bring the migration to %d bytes of queues and state, over the limit of %d",
				ErrOverLimit, tupleOf(s), a.bytes+n, a.pol.MaxBytes)}
	}
	l, r := s.Tuple()
	t := firewall.Tuple{Local: l, Remote: r}
	if other, dup := a.tuples[t]; dup {
		return &Refusal{Code: transport.VerdictConflict,
			Err: fmt.Errorf("%w: connection %d has the same 4-tuple %s", ErrConflict, other, t)}
	}
	a.tuples[t] = index
	a.bytes += n
	return nil
}

// forget undoes the admission of connection index, which took n bytes (a
// refused one holds no tuple and took none): its pre-copy gives way to its
// final snapshot, admitted anew.
func (a *admission) forget(index uint32, t firewall.Tuple, n uint64) {
	if i, ok := a.tuples[t]; ok && i == index {
		delete(a.tuples, t)
	}
	a.bytes -= n
}

// cost is what a batch of received records holds of the budget.
func (a *admission) cost(batch []record) int64 {
	var n int64
	for _, r := range batch {
		n += a.buf.clamp(int64(queueBytes(r.snap, r.state)))
	}
	return n
}

// budget bounds the bytes held by the records of a migration between the
// readers of its streams and the restore: a reader takes room for a record
// before it hands it on, and the restore gives it back once the batch is
// done. A record larger than the whole budget takes all of it, so that one
// record always fits.
type budget struct {
	mu   sync.Mutex // guards free and wake
	free int64
	max  int64
	wake chan struct{} // closed and replaced when room is given back
}

func (b *budget) init(n int64) {
	b.free, b.max, b.wake = n, n, make(chan struct{})
}

func (b *budget) clamp(n int64) int64 { return min(n, b.max) }

// acquire waits until n bytes (at most the whole budget) are free and
// takes them, or until ctx ends.
func (b *budget) acquire(ctx context.Context, n int64) error {
	n = b.clamp(n)
	for {
		b.mu.Lock()
		if b.free >= n {
			b.free -= n
			b.mu.Unlock()
			return nil
		}
		wake := b.wake
		b.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// release gives back n bytes taken by acquire.
func (b *budget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.free += n
	close(b.wake)
	b.wake = make(chan struct{})
	b.mu.Unlock()
}

// verdictOf returns the verdict of a connection that err kept from being
// restored.
func verdictOf(err error) transport.VerdictCode {
	var r *Refusal
	if errors.As(err, &r) {
		return r.Code
	}
	return transport.VerdictFailed
}

// abortCode returns the code of the Abort that tells the source why a
// migration ended.
func abortCode(err error) transport.AbortCode {
	switch {
	case errors.Is(err, ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return transport.AbortTimeout
	case errors.Is(err, context.Canceled):
		return transport.AbortCanceled
	case errors.Is(err, ErrOverLimit), errors.Is(err, ErrReused), errors.Is(err, ErrRole),
		errors.Is(err, ErrNotAllowed), errors.Is(err, transport.ErrLimit):
		return transport.AbortPolicy
	}
	return transport.AbortError
}

// refusedWhole reports whether err refused a migration as a whole, before
// anything was created for it.
func refusedWhole(err error) bool {
	return errors.Is(err, ErrOverLimit) || errors.Is(err, ErrReused) || errors.Is(err, ErrRole) || errors.Is(err, ErrBusy)
}
