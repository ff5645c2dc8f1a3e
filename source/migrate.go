package source

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/journal"
	"github.com/tcpmigrate/tcpmigrate/internal/nsdo"
	"github.com/tcpmigrate/tcpmigrate/internal/shares"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// Errors of the source agent.
var (
	// ErrInDoubt means Commit was sent and the target's answer could not be
	// learnt: the connections may live on the target. The journal keeps
	// what `tcpmigrate recover` needs to resolve it.
	ErrInDoubt = errors.New("source: migration in doubt: commit sent, outcome unknown")
	// ErrNothingToMigrate means no connection was eligible.
	ErrNothingToMigrate = errors.New("source: no connection can be migrated")
)

// streams is how many snapshot streams carry the connections in parallel.
const streams = 2

// flushEvery is how many snapshots a stream sends at a time, so that the
// target restores the first while the source still captures the next: the
// pipeline of the freeze.
const flushEvery = 32

// conn is the source's bookkeeping for one connection.
type conn struct {
	Conn
	fd       int
	index    uint32 // wire index, 0..Count-1, among the eligible ones
	tuple    firewall.Tuple
	snap     repair.Snapshot // queues dropped once sent
	captured bool            // in repair mode on the source
	verdict  bool            // the target's verdict on it has arrived
	held     bool            // held with a zero window before the lock (hold.go)
	// mark is the pre-copy's (precopy.go): taken when the target has a
	// copy of the connection from before the lock.
	mark   repair.Mark
	preRaw int  // the queue bytes of the pre-copy
	done   bool // committed or rolled back
	// committed: finish took it (the target's, or lost there); its File
	// is closed, and its descriptor number may be another socket's.
	committed bool
	res       *ConnResult
	// pendingOn is the listener whose accept queue the connection was
	// taken from (listeners.go); nil for a connection the caller gave.
	pendingOn *listener
}

// load sets scratch to c's inspected snapshot, keeping scratch's queue
// buffers (those of the last capture of a share) for the capture to fill.
func (c *conn) load(scratch *repair.Snapshot) {
	recvq, sendq := scratch.RecvQueue[:0], scratch.SendQueue[:0]
	*scratch = c.snap
	scratch.RecvQueue, scratch.SendQueue = recvq, sendq
}

// keep makes the captured scratch c's snapshot, without the queues, whose
// buffers the share reuses once they are written.
func (c *conn) keep(scratch *repair.Snapshot) {
	c.snap = *scratch
	c.snap.RecvQueue, c.snap.SendQueue = nil, nil
}

type migration struct {
	cfg    Config
	log    *slog.Logger
	id     transport.MigrationID
	res    Result
	state  State
	conns  []*conn
	elig   []*conn // by wire index
	link   *transport.Link
	wire   *countConn
	lock   *firewall.Lock
	jr     *journal.Journal
	rec    journal.Record
	locked time.Time // when the source lock went on
	// freezeEnds are, by connection index, when the target resumed each
	// connection, on this clock (estimated from COMMITTED:
	// transport.Committed.Freezes).
	freezeEnds []time.Time
	phase      time.Time // start of the current phase

	switched bool
	// writers are the snapshot streams, opened before the lock; once
	// streamDone is set, stream owns them (it closes or aborts each).
	writers []*transport.SnapshotWriter
	// streamDone receives stream's result, from the moment prepare starts
	// it; streamsEnded is set once it has been received (prepare, or
	// waitStreams at the end of run).
	streamDone   chan error
	streamsEnded bool
	msgs         chan transport.Message
	recvErr      chan error

	mu sync.Mutex // guards captured, verdict and done of every conn, and res.RawBytes

	hold holder // the zero-window hold (hold.go)

	lsn      []*listener          // listeners.go
	lsnLock  *firewall.ListenLock // drops SYNs to lsn while they move
	lsnReady bool                 // LISTENERS_READY received
}

// Migrate moves conns to the target agent at cfg.To and reports what
// became of each. It closes the File of every connection it commits (the
// socket is in repair mode, so silently); the Files of the others are the
// caller's again, to close or to hand back to their owner. The error is nil when the handoff ran to its end, even if
// the target refused some connections (they are rolled back and reported);
// it is non-nil when the migration was aborted (every connection rolled
// back) or is in doubt (ErrInDoubt).
func Migrate(ctx context.Context, cfg Config, conns []Conn) (*Result, error) {
	if cfg.Lease == 0 {
		cfg.Lease = DefaultLease
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	m := &migration{cfg: cfg, log: cfg.Log, id: transport.NewMigrationID()}
	if m.log == nil {
		m.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	m.log = m.log.With("migration", m.id.String(), "role", "source")
	m.res.Migration = m.id
	m.phase = time.Now()
	for i, c := range conns {
		m.conns = append(m.conns, &conn{Conn: c, fd: rawFD(c.File)})
		m.res.Conns = append(m.res.Conns, ConnResult{Index: uint32(i)})
	}
	m.linkResults()
	err := m.run(ctx)
	m.settleListeners()
	for _, c := range m.conns {
		if c.res.Outcome == "" {
			c.res.Outcome = Failed
		}
	}
	m.res.State = m.state
	if m.wire != nil {
		m.res.WireBytes = m.wire.n.Load()
	}
	return &m.res, err
}

// linkResults points each connection at its result, m.res.Conns[i] for
// m.conns[i]; appending to m.res.Conns may have moved them.
func (m *migration) linkResults() {
	for i, c := range m.conns {
		c.res = &m.res.Conns[i]
	}
}

func (m *migration) fault(s Step) error {
	if m.cfg.Fault == nil {
		return nil
	}
	if err := m.cfg.Fault(s); err != nil {
		return fmt.Errorf("source: step %s: %w", s, err)
	}
	return nil
}

func (m *migration) endPhase(name string) {
	now := time.Now()
	m.res.Phases = append(m.res.Phases, Phase{Name: name, Duration: now.Sub(m.phase)})
	m.phase = now
}

func (m *migration) setState(s State) {
	m.log.Debug("state", "from", m.state.String(), "to", s.String())
	m.state = s
}

func (m *migration) run(ctx context.Context) error {
	jr, err := journal.Open(m.cfg.JournalDir)
	if err != nil {
		return err
	}
	m.jr = jr
	// A frozen owner (Annotate names it) or listeners about to be taken
	// (their SYNs locked, their queues accepted) must be in a record before
	// anything can fail or crash: recover would find nothing to thaw or
	// unlock. The connection list follows once it is known.
	if m.cfg.Annotate != nil || len(m.cfg.Listeners) > 0 {
		if err := m.writeJournal(); err != nil {
			return err
		}
	}
	if err := m.fault(StepDial); err != nil {
		return m.rollbackAll(ctx, err)
	}
	if err := m.dial(ctx); err != nil {
		return m.rollbackAll(ctx, err)
	}
	defer m.link.Close()
	m.setState(StateConnected)
	m.endPhase("connect")

	if err := m.takeListeners(ctx); err != nil {
		return m.rollbackAll(ctx, err)
	}
	if err := m.fault(StepInspect); err != nil {
		return m.rollbackAll(ctx, err)
	}
	m.inspect()
	if len(m.elig) == 0 && len(m.lsn) == 0 {
		m.sendAbort(transport.AbortPolicy, "no connection can be migrated")
		if m.rec.Migration != "" {
			m.jr.Remove(&m.rec)
		}
		return ErrNothingToMigrate
	}
	m.endPhase("inspect")

	// The journal first (recovery needs it as soon as anything can be
	// left behind), then Prepare, then the lock table: the target makes its
	// own table and writes its journal while the source makes its table.
	// None of it belongs in the freeze window.
	if err := m.writeJournal(); err != nil {
		return m.rollbackAll(ctx, err)
	}
	if err := m.fault(StepPrepare); err != nil {
		return m.rollbackAll(ctx, err)
	}
	m.msgs, m.recvErr = make(chan transport.Message, 64), make(chan error, 1)
	go m.receive(ctx)
	ctrl := m.link.Control()
	if err := ctrl.Send(ctx, m.prepareMsg()); err != nil {
		return m.rollbackAll(ctx, err)
	}
	if err := m.sendListeners(ctx); err != nil {
		return m.rollbackAll(ctx, err)
	}
	if err := m.newLock(); err != nil {
		return m.rollbackAll(ctx, err)
	}
	defer m.closeLock()
	defer m.closeHold()
	// The renewer too (it renews what is locked, nothing yet).
	if err := m.lock.StartRenewer(0, func(err error) { m.log.Warn("lease renewal failed", "err", err) }); err != nil {
		return m.rollbackAll(ctx, err)
	}
	defer m.lock.StopRenewer()

	// The snapshot streams (and their compressors) are opened before the
	// lock too; prepare cancels sctx when it returns, which stops them.
	sctx, scancel := context.WithCancel(ctx)
	defer scancel()
	defer m.abortUnusedStreams()
	defer m.waitStreams(scancel) // before scancel: the streams end by themselves
	if err := m.openStreams(sctx); err != nil {
		return m.rollbackAll(ctx, err)
	}
	if err := m.awaitReady(ctx); err != nil {
		return m.rollbackAll(ctx, err)
	}
	// The target recreates the listeners (and closes the sockets it made
	// for the connections: target/listeners.go) when LISTENERS reaches it,
	// after READY: awaited here, that work is done before the freeze, not
	// beside its first restores, and a refused listener aborts the
	// migration before anything is locked. Without a connection nothing is
	// frozen, and the target answers PREPARED at once, before
	// LISTENERS_READY: awaitListeners takes it after prepare then.
	if len(m.elig) > 0 {
		if err := m.awaitListeners(ctx); err != nil {
			return m.rollbackAll(ctx, err)
		}
	}
	m.endPhase("prepare")
	// Pause, hold and lock, in one wave or two (waves.go).
	if err := m.lockWaves(ctx); err != nil {
		return m.rollbackAll(ctx, err)
	}
	m.setState(StateLocked)

	m.setState(StatePreparing)

	if err := m.prepare(ctx, scancel); err != nil {
		return m.rollbackAll(ctx, err)
	}
	if err := m.awaitListeners(ctx); err != nil {
		return m.rollbackAll(ctx, err)
	}
	m.setState(StatePrepared)
	m.endPhase("dump+restore")
	if m.okCount() == 0 && len(m.lsn) == 0 {
		m.sendAbort(transport.AbortPolicy, "the target refused every connection")
		m.finishRollback()
		return nil
	}
	if refused := len(m.elig) - m.okCount(); refused > 0 && m.cfg.Switch != nil {
		// A refused connection lives on here, but the switch takes its
		// address away: it would be reset. With an identity move it is all
		// or nothing.
		return m.rollbackAll(ctx, fmt.Errorf("source: the target refused %d of %d connections, which cannot stay here once the identity moves", refused, len(m.elig)))
	}

	if err := m.fault(StepSwitch); err != nil {
		return m.rollbackAll(ctx, err)
	}
	if err := m.doSwitch(ctx); err != nil {
		return m.rollbackAll(ctx, err)
	}
	m.setState(StateSwitched)
	// The last record before Commit: from "switched" on, recovery asks the
	// target (Commit may have been sent). An Update: no fsync, and the
	// connection list, written before the lock, is not rewritten
	// (docs/faults.md). After an identity move the "switching" record,
	// with the same addresses, already says this (recovery treats both
	// alike): a second write would only lengthen the freeze.
	if !m.switched {
		m.rec.State, m.rec.Released = StateSwitched.String(), m.cfg.SwitchAddrs
		if err := m.jr.Update(&m.rec); err != nil {
			return m.rollbackAll(ctx, err)
		}
	}
	m.endPhase("switch")

	if err := m.fault(StepCommit); err != nil {
		return m.rollbackAll(ctx, err)
	}
	m.setState(StateCommitting)
	committed, err := m.commit(ctx)
	if err != nil {
		committed, err = m.resolve(ctx, err)
		if err != nil {
			m.setState(StateInDoubt)
			m.rec.State = StateInDoubt.String()
			m.jr.Update(&m.rec)
			for _, c := range m.elig {
				if !c.done {
					c.res.Err = ErrInDoubt
				}
			}
			return err
		}
		if committed == nil {
			// The target aborted: everything comes back here.
			return m.rollbackAll(ctx, errors.New("source: the target aborted the migration"))
		}
	}
	m.endPhase("commit")
	return m.finish(committed)
}

// dial connects to the target through a byte counter.
func (m *migration) dial(ctx context.Context) error {
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, m.cfg.Timeout)
	defer cancel()
	nc, err := d.DialContext(dctx, "tcp", m.cfg.To)
	if err != nil {
		return fmt.Errorf("source: dial %s: %w", m.cfg.To, err)
	}
	m.wire = &countConn{Conn: nc}
	m.link, err = transport.Client(ctx, m.wire, m.cfg.Transport)
	return err
}

// inspect refuses what cannot move (leaving it untouched) and indexes the rest.
func (m *migration) inspect() {
	// On every core, each in the sockets' namespace once, in chunks handed
	// to whichever is free; one sock_diag dump for all of them
	// (repair.Inspector), not one each. About 20 µs per connection, which
	// the workload's pause waits for: one core took 200 ms for 10,000
	// while the other idled.
	errs, err := m.inspectEach(m.conns)
	for i, c := range m.conns {
		c.res.Local, c.res.Remote = c.snap.Local, c.snap.Remote
		if err := errors.Join(err, errs[i]); err != nil {
			c.res.Outcome, c.res.Err, c.done = RolledBack, err, true
			m.log.Info("connection stays", "conn", c.res.Index, "reason", err)
			continue
		}
		c.index = uint32(len(m.elig))
		l, r := c.snap.Tuple()
		c.tuple = firewall.Tuple{Local: l, Remote: r}
		m.elig = append(m.elig, c)
	}
}

// inspectEach runs Inspect on each of conns, into its snap, and returns
// each one's error, and an error that concerns them all (the namespace).
//
// The Inspector's dump of the namespace costs a few microseconds for every
// socket in it, a lookup of one socket about 25: a few connections among
// many (the busy wave's second look: 35 ms at 10,000 with the dump) are
// looked up one by one.
func (m *migration) inspectEach(conns []*conn) ([]error, error) {
	errs := make([]error, len(conns))
	var in repair.Inspector
	inspect := in.Inspect
	if len(conns)*8 < len(m.conns) {
		inspect = repair.Inspect
	}
	err := shares.Chunks(len(conns), minInspectShare, inspectChunk, func(chunks iter.Seq2[int, int]) error {
		return nsdo.Do(m.cfg.NetNS, func() error {
			for lo, hi := range chunks {
				for i := lo; i < hi; i++ {
					errs[i] = inspect(conns[i].fd, &conns[i].snap)
				}
			}
			return nil
		})
	})
	return errs, err
}

// pause asks the owner of a live hand-over to stop using the connections
// about to be locked (Config.Pause), takes the states it gives, and returns
// those connections. Only the caller's connections are named: those
// Migrate accepted from a listener's queue (pendingOn) were never the
// owner's, and their indices are past the caller's conns.
func (m *migration) pause(ctx context.Context, wave []*conn, phase string) ([]*conn, error) {
	var owned []*conn
	var idx []int
	for _, c := range wave {
		if c.pendingOn == nil && !c.done {
			owned = append(owned, c)
			idx = append(idx, int(c.res.Index))
		}
	}
	if len(owned) == 0 {
		return nil, nil
	}
	states, err := m.cfg.Pause(ctx, idx)
	if err != nil {
		return nil, fmt.Errorf("source: pause the connections' owner: %w", err)
	}
	if states != nil {
		if len(states) != len(idx) {
			return nil, fmt.Errorf("source: the connections' owner paused %d connections and gave %d states", len(idx), len(states))
		}
		for i, c := range owned {
			c.AppState = states[i]
		}
	}
	m.endPhase(phase)
	return owned, nil
}

// reinspect inspects the paused connections of a live hand-over again: the
// owner may have changed what the first inspection read (options, a
// shutdown, the state) while it served them. The presets PREPARE sent stay
// right, since a restore writes whatever option its snapshot has and its
// preset does not. A connection that cannot be migrated any more fails the
// migration, which hands everything back: PREPARE has announced it, and
// the target expects it. (The addresses cannot have changed: the agent's
// descriptor is of the same connected socket.)
func (m *migration) reinspect(paused []*conn) error {
	errs, err := m.inspectEach(paused)
	for i, c := range paused {
		if err := errors.Join(err, errs[i]); err != nil {
			return fmt.Errorf("source: connection %d (%s) changed while its owner served it: %w", c.res.Index, c.tuple, err)
		}
	}
	return nil
}

// minInspectShare is the fewest connections worth a goroutine of their own
// for Inspect, and inspectChunk how many a goroutine takes at a time.
const (
	minInspectShare = 32
	inspectChunk    = 32
)

// tupleBytes bounds the encoded size of one 4-tuple in PREPARE without its
// addresses' zones (two IPv6 address-ports and a preset index, 53 bytes
// with their headers), and presetBytes that of one option preset (six
// small integers: 46 bytes at most).
const (
	tupleBytes  = 56
	presetBytes = 96
)

// prepareMsg is the PREPARE of the migration. On a version-2 link it lists
// the 4-tuples, if they all fit in one frame, for the target to lock and
// make sockets for before the freeze, and the option presets that fit
// beside them.
func (m *migration) prepareMsg() *transport.Prepare {
	p := &transport.Prepare{Migration: m.id, Count: uint32(len(m.elig)), Lease: m.cfg.Lease}
	room := int(m.link.Peer().Limits.MaxFrame) - tupleBytes // the frame's own fields
	for _, c := range m.elig {
		room -= tupleBytes + len(c.snap.Local.Addr().Zone()) + len(c.snap.Remote.Addr().Zone())
	}
	if m.link.Version() < 2 || room < 0 {
		return p
	}
	p.Tuples = make([]transport.Tuple, len(m.elig))
	presets := map[repair.Options]uint32{}
	for i, c := range m.elig {
		// As the socket sees them: IPv4-mapped for an AF_INET6 socket (a
		// dual-stack server's IPv4 client), so that the target makes its
		// socket ahead of the freeze in the right family. The target
		// unmaps them for its lock and its policy.
		p.Tuples[i] = transport.Tuple{Local: c.snap.Local, Remote: c.snap.Remote}
		// The options the target may set on that socket ahead of the
		// freeze too, as inspected (the snapshot carries the same): a
		// workload's connections mostly share one set, sent once.
		o := repair.PresetOf(&c.snap.Options)
		n, ok := presets[o]
		if !ok && len(p.Presets) < transport.MaxPresets && room >= presetBytes {
			room -= presetBytes
			p.Presets = append(p.Presets, o)
			n, ok = uint32(len(p.Presets)), true
			presets[o] = n
		}
		if ok {
			p.Tuples[i].Preset = n
		}
	}
	return p
}

// awaitReady waits, on a version-2 link, until the target says it is
// ready (its lock table, journal and the locks of the announced tuples are
// in place): none of that may fall inside the freeze.
func (m *migration) awaitReady(ctx context.Context) error {
	if m.link.Version() < 2 {
		return nil
	}
	for {
		msg, err := m.await(ctx)
		if err != nil {
			return err
		}
		switch msg := msg.(type) {
		case *transport.Ready:
			return nil
		case *transport.ListenersReady:
			if err := m.listenersReady(msg); err != nil {
				return err
			}
		default:
			return fmt.Errorf("source: unexpected %s while waiting for READY", msg.Type())
		}
	}
}

// lockInstance names the source's lock of this migration.
func (m *migration) lockInstance() string { return "src-" + m.id.String()[:16] }

// listenLockInstance names the source's listener lock of this migration.
func (m *migration) listenLockInstance() string { return "srcl-" + m.id.String()[:16] }

// closeLock removes the source's lock, except in doubt: the source copies
// are in repair mode and may live on the target, so the lock stays, its
// lease running out (the renewer is stopped), for recover to remove once
// it has resolved the migration (docs/handoff.md).
func (m *migration) closeLock() {
	if m.state == StateInDoubt {
		m.lock.StopRenewer()
		return
	}
	m.lock.Close()
}

// writeJournal writes the record that recovery needs, with the connection
// list, before the lock table exists and before anything is locked. It
// names the tables about to be made (recovery removes a table that is
// missing without complaint). With a frozen owner or listeners it is
// written twice: before the link is dialled (no connection yet: the owner
// and the listener lock) and once the connections are known.
func (m *migration) writeJournal() error {
	m.rec = journal.Record{Migration: m.id.String(), Role: journal.Source, State: StateLocked.String(), Peer: m.cfg.To,
		Lock: firewall.TableName(m.lockInstance())}
	if len(m.cfg.Listeners) > 0 {
		m.rec.ListenLock = firewall.TableName(m.listenLockInstance())
	}
	for _, c := range m.elig {
		m.rec.Conns = append(m.rec.Conns, journal.Conn{Index: c.index, Local: c.tuple.Local, Remote: c.tuple.Remote, FD: c.OwnerFD,
			Family: c.snap.Family, ReuseAddr: c.snap.Options.ReuseAddr})
	}
	if m.cfg.Annotate != nil {
		m.cfg.Annotate(&m.rec)
	}
	return m.jr.Write(&m.rec)
}

// newLock creates the source's lock table.
func (m *migration) newLock() error {
	lock, err := firewall.New(firewall.Config{Instance: m.lockInstance(), NetNS: m.cfg.NetNS, Lease: m.cfg.Lease,
		Hold: m.wantHold()})
	if err != nil {
		return err
	}
	m.lock = lock
	return nil
}

// lockWave locks the connections of a wave in one batch (those held move
// from the hold to the lock). The first wave's lock starts every freeze:
// a later wave's connections are reported frozen from it too.
func (m *migration) lockWave(wave []*conn) error {
	tuples := make([]firewall.Tuple, len(wave))
	for i, c := range wave {
		tuples[i] = c.tuple
	}
	if err := m.lock.Lock(tuples); err != nil {
		return err
	}
	if m.locked.IsZero() {
		m.locked = time.Now()
	}
	return nil
}

// receive forwards control messages to the main loop.
func (m *migration) receive(ctx context.Context) {
	for {
		msg, err := m.link.Control().Recv(ctx)
		if err != nil {
			m.recvErr <- err
			return
		}
		select {
		case m.msgs <- msg:
		case <-ctx.Done():
			return
		}
	}
}

// prepare captures and streams every eligible connection while collecting
// the target's verdicts; refused connections are rolled back on the spot.
func (m *migration) prepare(ctx context.Context, stopStreams context.CancelFunc) (err error) {
	if err := m.fault(StepCapture); err != nil {
		return err
	}
	sent := make(chan error, 1)
	captured := make(chan struct{})
	m.streamDone = sent // from here stream ends every writer
	go func() { sent <- m.stream(captured) }()
	defer func() {
		// Wait until the streams capture no more (stopping them first on
		// failure): a rollback must see every capture they made, or a
		// socket captured after it would stay in repair mode. Their ends
		// (end records, FINs) need not be waited for: once the target has
		// answered PREPARED it has every snapshot, and writing them must
		// not delay the switch (waitStreams collects them).
		if err != nil {
			stopStreams()
		}
		<-captured
	}()

	streamed := false
	verdicts := 0
	timeout := time.NewTimer(m.cfg.Timeout)
	defer timeout.Stop()
	for {
		select {
		case err := <-sent:
			m.streamsEnded = true
			if err != nil {
				return err
			}
			streamed = true
			if err := m.fault(StepVerdicts); err != nil {
				return err
			}
		case msg := <-m.msgs:
			switch msg := msg.(type) {
			case *transport.Verdicts:
				verdicts += len(msg.Verdicts)
				if err := m.applyVerdicts(msg.Verdicts); err != nil {
					return err
				}
			case *transport.ListenersReady:
				if err := m.listenersReady(msg); err != nil {
					return err
				}
			case *transport.Prepared:
				if !streamed {
					// The target can be quicker than this loop's select,
					// or than the streams' ends.
					<-captured
					if err := m.fault(StepVerdicts); err != nil {
						return err
					}
				}
				if int(msg.Count) != len(m.elig) || verdicts != len(m.elig) {
					return fmt.Errorf("source: target prepared %d of %d connections with %d verdicts", msg.Count, len(m.elig), verdicts)
				}
				return nil
			case *transport.Abort:
				return fmt.Errorf("source: target aborted: %s: %s", msg.Code, msg.Reason)
			default:
				return fmt.Errorf("source: unexpected %s while preparing", msg.Type())
			}
		case err := <-m.recvErr:
			return fmt.Errorf("source: link lost while preparing: %w", err)
		case <-timeout.C:
			return fmt.Errorf("source: no verdicts from the target within %s", m.cfg.Timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// stream captures the connections and writes their snapshots on parallel
// streams, each connection on stream index%streams. It closes captured once
// no stream will capture again, before the streams are closed.
func (m *migration) stream(captured chan<- struct{}) error {
	n := len(m.writers)
	if n == 0 {
		close(captured)
		return nil
	}
	errs := make(chan error, n)
	var done atomic.Int64
	var capturing atomic.Int32
	capturing.Store(int32(n))
	for s := 0; s < n; s++ {
		go func(s int) {
			errs <- m.streamShare(m.writers[s], s, n, &done, func() {
				if capturing.Add(-1) == 0 {
					close(captured)
				}
			})
		}(s)
	}
	var first error
	for range n {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// openStreams opens the snapshot streams, one per share of the connections.
func (m *migration) openStreams(ctx context.Context) error {
	for range min(streams, len(m.elig)) {
		w, err := m.link.OpenSnapshotStream(ctx)
		if err != nil {
			return err
		}
		m.writers = append(m.writers, w)
	}
	return nil
}

// abortUnusedStreams ends the streams that stream never took over.
func (m *migration) abortUnusedStreams() {
	if m.streamDone != nil {
		return // stream took them over
	}
	for _, w := range m.writers {
		w.Abort()
	}
}

// streamShare captures the connections of one share and writes them on w,
// which it closes (or aborts). It calls captured once it will capture no
// more, before it closes w.
func (m *migration) streamShare(w *transport.SnapshotWriter, share, n int, done *atomic.Int64, captured func()) error {
	err := m.captureShare(w, share, n, done)
	captured()
	if err != nil {
		w.Abort()
		return err
	}
	return w.Close()
}

// waitStreams waits for the snapshot streams to end, once prepare has
// returned without waiting for them, for at most the configured timeout;
// then it stops them (stop cancels their context) and waits no more.
func (m *migration) waitStreams(stop context.CancelFunc) {
	if m.streamDone == nil || m.streamsEnded {
		return
	}
	m.streamsEnded = true
	t := time.NewTimer(m.cfg.Timeout)
	defer t.Stop()
	select {
	case err := <-m.streamDone:
		if err != nil {
			m.log.Warn("a snapshot stream ended with an error after the target prepared", "err", err)
		}
	case <-t.C:
		stop()
		m.log.Warn("snapshot streams still closing after the timeout: stopped", "timeout", m.cfg.Timeout)
	}
}

// captureShare captures the connections of one share and writes them on w.
func (m *migration) captureShare(w *transport.SnapshotWriter, share, n int, done *atomic.Int64) error {
	var scratch repair.Snapshot
	sent := 0
	for i := share; i < len(m.elig); i += n {
		c := m.elig[i]
		m.mu.Lock()
		settled := c.done
		m.mu.Unlock()
		if settled {
			// Settled already (applyVerdicts refuses a verdict before the
			// capture, so this is a guard): capturing it now would leave
			// it in repair mode for good.
			continue
		}
		capture := repair.Capture
		if c.mark.Taken() {
			same, err := repair.Unchanged(c.fd, &c.snap, &c.mark)
			if err != nil {
				return err
			}
			if same {
				m.mu.Lock()
				c.captured = true
				m.res.Confirmed++
				m.res.RawBytes += int64(c.preRaw)
				m.mu.Unlock()
				if err := w.Confirm(c.index); err != nil {
					return err
				}
				if p := m.cfg.Progress; p != nil {
					p(int(done.Add(1)), len(m.elig))
				}
				continue
			}
			// It moved: captured again below, in the repair mode Unchanged
			// left it in, and the target's copy is replaced.
			capture = repair.Recapture
		}
		c.load(&scratch)
		if err := capture(c.fd, &scratch); err != nil {
			return err
		}
		if c.held {
			scratch.MarkHeld()
		}
		m.mu.Lock()
		c.captured = true
		m.res.RawBytes += int64(len(scratch.RecvQueue) + len(scratch.SendQueue))
		m.mu.Unlock()
		c.keep(&scratch)
		if err := w.WriteState(c.index, &scratch, c.AppState); err != nil {
			return err
		}
		// A chunk holds hundreds of idle snapshots: without a flush the
		// target would restore nothing until the stream closes. The first
		// goes at once, to start the target's pipeline. The share's last
		// goes with Close, in the same chunk as the end record: a flush
		// would only send one more frame.
		if sent++; (sent == 1 || sent%flushEvery == 0) && i+n < len(m.elig) {
			if err := w.Flush(); err != nil {
				return err
			}
		}
		if p := m.cfg.Progress; p != nil {
			p(int(done.Add(1)), len(m.elig))
		}
	}
	return nil
}

// applyVerdicts rolls back, on the source alone, the connections the target
// refused or failed to restore. A verdict must answer a snapshot: one for
// a connection not captured yet, or a second one, is a protocol error
// (the migration rolls back), never counted or acted upon.
func (m *migration) applyVerdicts(vs []transport.Verdict) error {
	var back []*conn
	var tuples []firewall.Tuple
	m.mu.Lock()
	for _, v := range vs {
		if int(v.Index) >= len(m.elig) {
			m.mu.Unlock()
			return fmt.Errorf("source: verdict for unknown connection %d", v.Index)
		}
		c := m.elig[v.Index]
		if c.verdict {
			m.mu.Unlock()
			return fmt.Errorf("source: second verdict for connection %d (%s)", v.Index, c.tuple)
		}
		if !c.captured {
			m.mu.Unlock()
			return fmt.Errorf("source: verdict for connection %d (%s) before its snapshot was sent", v.Index, c.tuple)
		}
		c.verdict = true
	}
	m.mu.Unlock()
	for _, v := range vs {
		if v.OK() {
			continue
		}
		c := m.elig[v.Index]
		c.res.Err = fmt.Errorf("source: target refused %s: %s: %s", c.tuple, v.Code, v.Reason)
		back = append(back, c)
		tuples = append(tuples, c.tuple)
	}
	if len(back) == 0 {
		return nil
	}
	if err := m.lock.Unlock(tuples); err != nil {
		return err
	}
	for _, c := range back {
		m.resumeOne(c)
	}
	return nil
}

// resumeOne gives one connection back to the source's stack: repair off
// (its window probe re-synchronises the peer) and options put back. The
// connection must already be unlocked.
func (m *migration) resumeOne(c *conn) {
	m.mu.Lock()
	captured := c.captured
	c.done, c.captured = true, false
	m.mu.Unlock()
	if captured {
		err := m.resumeSocket(c)
		switch {
		case errors.Is(err, repair.ErrResumedLive):
			// Out of repair mode and live: only its kick or an option is
			// lost. It is rolled back; the peer resumes it at its next
			// probe.
			m.log.Warn("rolled back without its kick or an option", "conn", c.tuple.String(), "err", err)
		case err != nil:
			c.res.Outcome, c.res.Err = Failed, errors.Join(c.res.Err, err)
			return
		}
	} else if c.held {
		m.unhold(c)
	}
	c.res.Outcome = RolledBack
	if !m.locked.IsZero() { // rolled back before the lock: never frozen
		c.res.Freeze = time.Since(m.locked)
	}
}

func (m *migration) okCount() int {
	n := 0
	for _, c := range m.elig {
		if !c.done {
			n++
		}
	}
	return n
}

// doSwitch moves the network identity and waits for the target to claim it.
// Before the identity moves, the journal says so ("switching", with the
// addresses about to be released): a crash in the switch is then
// recovered like one after it (the target is asked, the addresses claimed
// back if it aborted), not as if nothing had moved. An in-place Update,
// inside the freeze (docs/faults.md).
func (m *migration) doSwitch(ctx context.Context) error {
	if m.cfg.Switch != nil {
		m.setState(StateSwitching)
		m.rec.State, m.rec.Released = StateSwitching.String(), m.cfg.SwitchAddrs
		if err := m.jr.Update(&m.rec); err != nil {
			return err
		}
		m.switched = true // from here an abort must try to undo it
		if err := m.cfg.Switch(ctx); err != nil {
			return fmt.Errorf("source: switch: %w", err)
		}
	}
	if err := m.fault(StepSwitched); err != nil {
		return err
	}
	if err := m.link.Control().Send(ctx, &transport.Switch{Migration: m.id, Addrs: m.cfg.SwitchAddrs}); err != nil {
		return err
	}
	msg, err := m.await(ctx)
	if err != nil {
		return err
	}
	if _, ok := msg.(*transport.Switched); !ok {
		return fmt.Errorf("source: unexpected %s at the switch", msg.Type())
	}
	return nil
}

// await returns the next control message within the timeout.
func (m *migration) await(ctx context.Context) (transport.Message, error) {
	t := time.NewTimer(m.cfg.Timeout)
	defer t.Stop()
	select {
	case msg := <-m.msgs:
		if a, ok := msg.(*transport.Abort); ok {
			return nil, fmt.Errorf("source: target aborted: %s: %s", a.Code, a.Reason)
		}
		return msg, nil
	case err := <-m.recvErr:
		return nil, fmt.Errorf("source: link lost: %w", err)
	case <-t.C:
		return nil, fmt.Errorf("source: no answer from the target within %s", m.cfg.Timeout)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// commit sends Commit and waits for Committed.
func (m *migration) commit(ctx context.Context) (*transport.Committed, error) {
	var exclude []uint32
	for _, c := range m.elig {
		if c.done {
			exclude = append(exclude, c.index)
		}
	}
	sent := time.Now()
	if err := m.link.Control().Send(ctx, &transport.Commit{Migration: m.id, Exclude: exclude}); err != nil {
		return nil, err
	}
	msg, err := m.await(ctx)
	if err != nil {
		return nil, err
	}
	c, ok := msg.(*transport.Committed)
	if !ok {
		return nil, fmt.Errorf("source: unexpected %s after commit", msg.Type())
	}
	m.freezeEnds, _ = c.Freezes(sent, time.Now())
	return c, nil
}

// resolve asks the target, over new links, what became of the migration
// after the answer to Commit was lost. It returns the commit (with no
// failures listed: they are unknown) or nil when the target aborted.
func (m *migration) resolve(ctx context.Context, cause error) (*transport.Committed, error) {
	m.log.Warn("in doubt: asking the target", "err", cause)
	deadline := time.Now().Add(m.cfg.Timeout)
	for time.Now().Before(deadline) {
		st, err := Query(ctx, m.cfg.To, m.cfg.Transport, m.id)
		if err == nil {
			switch st {
			case transport.StateCommitted:
				return &transport.Committed{Migration: m.id}, nil
			case transport.StateAborted, transport.StateUnknown:
				return nil, nil
			}
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return nil, errors.Join(cause, ErrInDoubt)
		}
	}
	return nil, errors.Join(cause, ErrInDoubt)
}

// Query asks the target agent at addr what became of migration id.
func Query(ctx context.Context, addr string, cfg *transport.Config, id transport.MigrationID) (transport.MigrationState, error) {
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	link, err := transport.Dial(qctx, addr, cfg)
	if err != nil {
		return 0, err
	}
	defer link.Close()
	if err := link.Control().Send(qctx, &transport.Query{Migration: id}); err != nil {
		return 0, err
	}
	msg, err := link.Control().Recv(qctx)
	if err != nil {
		return 0, err
	}
	o, ok := msg.(*transport.Outcome)
	if !ok {
		return 0, fmt.Errorf("source: unexpected %s in answer to a query", msg.Type())
	}
	return o.State, nil
}

// finish discards the source copies of the committed connections (silently:
// they are in repair mode) and releases the source lock.
func (m *migration) finish(c *transport.Committed) error {
	failed := map[uint32]transport.Verdict{}
	for _, v := range c.Failed {
		failed[v.Index] = v
	}
	ferr := m.fault(StepFinish)
	now := time.Now()
	for _, cn := range m.elig {
		if cn.done {
			continue
		}
		cn.done, cn.committed = true, true
		cn.res.Freeze = now.Sub(m.locked)
		if int(cn.index) < len(m.freezeEnds) && !m.freezeEnds[cn.index].IsZero() {
			// Until the target resumed it, not until its answer came back.
			cn.res.Freeze = m.freezeEnds[cn.index].Sub(m.locked)
		}
		if v, ok := failed[cn.index]; ok {
			cn.res.Outcome, cn.res.Err = Failed, fmt.Errorf("source: target could not deliver %s: %s: %s", cn.tuple, v.Code, v.Reason)
		} else {
			cn.res.Outcome = Committed
		}
		if ferr != nil {
			cn.res.Err = ferr
			continue
		}
		// The socket is in repair mode: closing it is silent. The owner's
		// other descriptors must go too (Config.BeforeRelease).
		if err := cn.File.Close(); err != nil {
			cn.res.Err = err
		}
	}
	m.setState(StateCommitted)
	var errs []error
	if m.cfg.BeforeRelease != nil {
		errs = append(errs, m.cfg.BeforeRelease())
	}
	errs = append(errs, m.releaseListeners(ferr == nil))
	errs = append(errs, m.lock.Close())
	if ferr == nil {
		errs = append(errs, m.jr.Remove(&m.rec))
	}
	m.endPhase("finish")
	return errors.Join(errs...)
}

// rollbackAll aborts: the target is told, the identity comes back, every
// connection is unlocked and resumed on the source.
func (m *migration) rollbackAll(ctx context.Context, cause error) error {
	m.log.Warn("rolling back", "err", cause)
	m.sendAbort(transport.AbortError, cause.Error())
	var errs []error
	if m.switched && m.cfg.Unswitch != nil {
		// The target may hold the identity: take it back only once the
		// target has let go of it, or both hosts would answer for it.
		errs = append(errs, m.awaitAborted(ctx))
		errs = append(errs, m.cfg.Unswitch(ctx))
	}
	if m.lock != nil {
		var tuples []firewall.Tuple
		for _, c := range m.elig {
			if !c.done {
				tuples = append(tuples, c.tuple)
			}
		}
		errs = append(errs, m.lock.Unlock(tuples))
	}
	for _, c := range m.conns {
		if !c.done {
			m.resumeOne(c)
			if c.res.Err == nil {
				c.res.Err = cause
			}
		}
	}
	m.finishRollback()
	return errors.Join(append([]error{cause}, errs...)...)
}

// awaitAborted asks the target until it reports the migration aborted (or
// unknown), within the timeout.
func (m *migration) awaitAborted(ctx context.Context) error {
	deadline := time.Now().Add(m.cfg.Timeout)
	for {
		st, err := Query(ctx, m.cfg.To, m.cfg.Transport, m.id)
		if err == nil && (st == transport.StateAborted || st == transport.StateUnknown) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("source: the target did not confirm the abort within %s (last: %v %v)", m.cfg.Timeout, st, err)
		}
		select {
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (m *migration) finishRollback() {
	m.releaseListeners(false)
	m.setState(StateRolledBack)
	if m.rec.Migration != "" {
		m.jr.Remove(&m.rec)
	}
}

func (m *migration) sendAbort(code transport.AbortCode, reason string) {
	if m.link == nil || m.state >= StateCommitting {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	m.link.Control().Send(ctx, &transport.Abort{Migration: m.id, Code: code, Reason: reason})
}

// countConn counts the bytes that cross the link, both ways.
type countConn struct {
	net.Conn
	n atomic.Int64
}

func (c *countConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func (c *countConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n.Add(int64(n))
	return n, err
}

// rawFD returns f's descriptor without File.Fd's side effect of switching
// the socket to blocking mode, which the owner's other descriptors share.
func rawFD(f *os.File) int {
	fd := -1
	if rc, err := f.SyscallConn(); err == nil {
		rc.Control(func(u uintptr) { fd = int(u) })
	}
	return fd
}
