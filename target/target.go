package target

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/audit"
	"github.com/tcpmigrate/tcpmigrate/internal/journal"
	"github.com/tcpmigrate/tcpmigrate/internal/nsdo"
	"github.com/tcpmigrate/tcpmigrate/internal/shares"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// State is the target's position in the handoff of one migration.
type State uint8

// The states of the target.
const (
	StateInit       State = iota // the link is up, no Prepare yet
	StatePreparing               // receiving, checking, locking and restoring
	StatePrepared                // every verdict sent; sockets held in repair mode
	StateSwitched                // the network identity was claimed
	StateCommitting              // Commit received: finishing whatever happens
	StateCommitted               // sockets delivered, outcome recorded
	StateAborted                 // sockets discarded, locks and address released
)

var stateNames = [...]string{"init", "preparing", "prepared", "switched", "committing", "committed", "aborted"}

// String returns the state's name as docs/handoff.md spells it.
func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", s)
}

// Step names a point of the target's handoff where Config.Fault can inject
// a failure.
type Step string

// The steps, in order.
const (
	StepPrepare  Step = "prepare"  // on Prepare, before anything is locked
	StepRestore  Step = "restore"  // before each batch is locked and restored
	StepPrepared Step = "prepared" // before Prepared (with the last verdicts) is sent
	StepSwitch   Step = "switch"   // on Switch, before the identity is claimed
	StepCommit   Step = "commit"   // on Commit, before the sockets are unlocked
	StepDeliver  Step = "deliver"  // before the sockets are delivered
)

// Steps lists every fault-injection step in order.
var Steps = []Step{StepPrepare, StepRestore, StepPrepared, StepSwitch, StepCommit, StepDeliver}

// Delivered is one connection handed to the application after a commit.
type Delivered struct {
	// File is the socket, connected and out of repair mode. The receiver
	// owns it.
	File          *os.File
	Local, Remote netip.AddrPort
	// AppState is the blob that travelled with the connection.
	AppState  []byte
	Migration transport.MigrationID
	Index     uint32
	// Listener is set for a listening socket (Remote is then invalid).
	Listener bool
	// PendingOn is, for a connection taken from a listener's accept queue
	// on the source (established, not yet accepted by the program), that
	// listener's address; the zero AddrPort otherwise.
	PendingOn netip.AddrPort
}

// Conn turns the delivered socket into a net.Conn (and closes File).
func (d *Delivered) Conn() (net.Conn, error) {
	c, err := net.FileConn(d.File)
	d.File.Close()
	return c, err
}

// Config configures a target agent.
type Config struct {
	// Transport configures the links (TLS, limits, capabilities).
	Transport *transport.Config
	// NetNS is a descriptor of the network namespace to restore and lock
	// in; 0 means the calling thread's.
	NetNS int
	// Allow lists the local addresses the target restores connections
	// for, in addition to Policy.Allow; anything else is refused (and
	// rolled back at the source).
	Allow []netip.Prefix
	// Policy says what the target accepts from sources (policy.go).
	Policy Policy
	// Audit, if set, receives one record per link: each migration with
	// its outcome, each query and each refused handshake.
	Audit *audit.Log
	// Claim takes the network identity at the switch (the addresses the
	// source names, or the agent's own --claim-addr). Nil does nothing.
	Claim func(ctx context.Context, addrs []netip.Prefix) error
	// Unclaim gives it back after an abort that came after Claim.
	Unclaim func(ctx context.Context, addrs []netip.Prefix) error
	// Deliver hands the committed connections to the application. A
	// connection it cannot take should be reported in the returned map
	// (index → error); the others are considered delivered.
	Deliver func(ctx context.Context, conns []*Delivered) map[uint32]error
	// DeliverWaves says that Deliver may be called twice for one
	// migration, never at once: first with the connections that have no
	// confirmed pre-copy (the source captured them after its lock: their
	// peers were busy), as soon as they are live, while the others are
	// still being woken; then with the others, the listeners, and the
	// connections pending on those listeners. Without it Deliver is called
	// once, after every connection is live. A Deliver that starts a
	// program per call must not set it (docs/handoff.md, "Delivery in
	// waves").
	DeliverWaves bool
	// JournalDir is where the target keeps its journal ("" = the default).
	JournalDir string
	// Log receives structured logs; nil discards them.
	Log *slog.Logger
	// Fault, for tests: called at each Step; a non-nil error makes that
	// step fail as if the operation had failed.
	Fault func(Step) error
}

// ConnReport is what became of one connection on the target.
type ConnReport struct {
	Index         uint32
	Local, Remote netip.AddrPort
	Verdict       transport.VerdictCode
	Delivered     bool
	// Premade says the connection was restored on a socket made before
	// the freeze (repair.Blank), not on a new one.
	Premade bool
	Err     error
}

// Report describes one migration as the target saw it.
type Report struct {
	Migration transport.MigrationID
	State     State
	// Count is the number of connections the source announced.
	Count uint32
	Conns []ConnReport
	// Query is set when the link only asked about an earlier migration.
	Query bool
	// Listeners are the listening sockets the source moved (listeners.go).
	Listeners []ListenerReport
}

// Server is a target agent. It is safe for concurrent use: each link is
// served on its own goroutine.
type Server struct {
	cfg   Config
	log   *slog.Logger
	jr    *journal.Journal
	guard *guard // policy and audit (policy_server.go)

	mu       sync.Mutex // guards outcomes
	outcomes map[transport.MigrationID]transport.MigrationState
}

// NewServer returns a target agent with the given configuration.
func NewServer(cfg Config) (*Server, error) {
	jr, err := journal.Open(cfg.JournalDir)
	if err != nil {
		return nil, err
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s := &Server{cfg: cfg, log: log.With("role", "target"), jr: jr, outcomes: map[transport.MigrationID]transport.MigrationState{}}
	s.guard = newGuard(&cfg, s.log)
	// Outcomes survive a restart through the journal. A record that cannot
	// be read hides no other (journal.List skips it); its migration is
	// answered Unknown, and the operator is told which file it is.
	recs, err := jr.List()
	if err != nil {
		s.log.Error("journal: some recorded outcomes cannot be read; their migrations will be answered unknown", "err", err)
	}
	for _, r := range recs {
		if r.Role != journal.Target {
			continue
		}
		if id, err := transport.ParseMigrationID(r.Migration); err == nil {
			s.outcomes[id] = recordedState(r.State)
		}
	}
	return s, nil
}

func recordedState(s string) transport.MigrationState {
	// "committing" means the agent died between deciding and resuming:
	// its sockets were still in repair mode and died silently with it, so
	// the source may safely take the connections back. The record says
	// "committed" only once the sockets are live (before they are handed
	// to the application), so that a crash never leaves two live copies.
	if s == StateCommitted.String() {
		return transport.StateCommitted
	}
	return transport.StateAborted
}

// Serve accepts links on ln and serves each until ctx ends. It returns the
// listener's error, or nil when ctx ends.
func (s *Server) Serve(ctx context.Context, ln *transport.Listener) error {
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		link, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.log.Warn("accept failed", "err", err)
			s.writeAudit(&audit.Record{Event: audit.EventHandshake, Outcome: audit.OutcomeRefused, Reason: err.Error()})
			continue
		}
		go func() {
			if _, err := s.ServeLink(ctx, link); err != nil {
				s.log.Warn("migration failed", "err", err)
			}
		}()
	}
}

// Outcome returns what the target recorded of a migration.
func (s *Server) Outcome(id transport.MigrationID) transport.MigrationState {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st, ok := s.outcomes[id]; ok {
		return st
	}
	return transport.StateUnknown
}

func (s *Server) record(id transport.MigrationID, st transport.MigrationState) {
	s.mu.Lock()
	s.outcomes[id] = st
	s.mu.Unlock()
}

// serveLink serves one link for ServeLink, once the peer is known to be a
// source. It closes the link.
func (s *Server) serveLink(ctx context.Context, link *transport.Link) (*Report, error) {
	defer link.Close()
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	msg, err := link.Control().Recv(rctx)
	cancel()
	if err != nil {
		err = fmt.Errorf("target: first message: %w", err)
		tellRefused(link, err)
		return nil, err
	}
	switch msg := msg.(type) {
	case *transport.Query:
		st := s.Outcome(msg.Migration)
		err := link.Control().Send(ctx, &transport.Outcome{Migration: msg.Migration, State: st})
		return &Report{Migration: msg.Migration, Query: true}, err
	case *transport.Prepare:
		m := &migration{srv: s, link: link, id: msg.Migration, count: msg.Count, lease: msg.Lease, announced: msg.Tuples,
			presets: msg.Presets,
			log:     s.log.With("migration", msg.Migration.String())}
		return m.run(ctx)
	default:
		err := fmt.Errorf("target: unexpected first message %s", msg.Type())
		tellRefused(link, err)
		return nil, err
	}
}

// conn is the target's bookkeeping for one connection.
type conn struct {
	snap     *repair.Snapshot
	appState []byte
	tuple    firewall.Tuple
	fd       int // restored socket, or -1
	report   ConnReport
	// pre says that the connection is restored (or refused) from a
	// pre-copy whose final or confirming record has not come yet;
	// precopied, that its pre-copy was confirmed: it was quiet before the
	// lock (the commit wakes the others first).
	pre, precopied bool
	// admitted is the bytes admission counted for it (0 if refused).
	admitted uint64
}

type migration struct {
	srv      *Server
	link     *transport.Link
	log      *slog.Logger
	id       transport.MigrationID
	count    uint32
	lease    time.Duration
	state    State
	lock     *firewall.Lock
	conns    []*conn // by index
	rec      journal.Record
	claimed  []netip.Prefix
	didClaim bool       // Claim was called: an abort must undo it
	adm      *admission // the policy applied to this migration's connections
	// announced are the 4-tuples PREPARE listed, by connection index;
	// prelocked[i] says that announced[i] was locked before the source's
	// freeze (prelock). Only the goroutine running the migration touches
	// them.
	announced []transport.Tuple
	// presets are PREPARE's option sets, which announced[i].Preset picks
	// (1-based) for connection i's Blank.
	presets   []repair.Options
	prelocked []bool
	rs        restorer // restores and resumes the connections, with crafted segments where their state needs them
	blanks    *blanks  // sockets made before the freeze, by connection index
	lsn       *listenerSet
}

func (m *migration) fault(st Step) error {
	if m.srv.cfg.Fault == nil {
		return nil
	}
	if err := m.srv.cfg.Fault(st); err != nil {
		return fmt.Errorf("target: step %s: %w", st, err)
	}
	return nil
}

func (m *migration) report() *Report {
	r := &Report{Migration: m.id, State: m.state, Count: m.count}
	for _, c := range m.conns {
		if c != nil {
			r.Conns = append(r.Conns, c.report)
		}
	}
	r.Listeners = m.listenerReports()
	return r
}

func (m *migration) run(ctx context.Context) (*Report, error) {
	cfg := &m.srv.cfg
	if m.lease <= 0 || m.lease > firewall.MaxLease {
		m.lease = firewall.DefaultLease
	}
	pol := &m.srv.guard.pol
	var refuse error
	if limit := min(pol.MaxConnections, m.link.Local().Limits.MaxConnections); m.count > limit {
		refuse = fmt.Errorf("%w: %d connections announced, the limit is %d", ErrOverLimit, m.count, limit)
	} else if !m.srv.reserve(m.id) {
		refuse = fmt.Errorf("%w: %s", ErrReused, m.id)
	}
	if refuse != nil {
		m.link.Control().Send(ctx, &transport.Abort{Migration: m.id, Code: transport.AbortPolicy, Reason: refuse.Error()})
		return m.report(), refuse
	}
	m.state = StatePreparing
	m.adm = newAdmission(pol, m.srv.guard.feats)
	m.conns = make([]*conn, m.count)
	if err := m.fault(StepPrepare); err != nil {
		return m.abort(ctx, err, true)
	}
	lock, err := firewall.New(firewall.Config{Instance: "tgt-" + m.id.String()[:16], NetNS: cfg.NetNS, Lease: max(m.lease, firewall.MinLease)})
	if err != nil {
		return m.abort(ctx, err, true)
	}
	m.lock = lock
	m.rec = journal.Record{Migration: m.id.String(), Role: journal.Target, State: StatePreparing.String(), Lock: lock.Table(),
		Peer: m.link.RemoteAddr().String()}
	// Not synced: its absence means what it says ("nothing live here"),
	// so it need not outlive a crash of the machine (docs/faults.md).
	if err := m.srv.jr.Update(&m.rec); err != nil {
		return m.abort(ctx, err, true)
	}
	if err := m.lock.StartRenewer(0, func(err error) { m.log.Warn("lease renewal failed", "err", err) }); err != nil {
		return m.abort(ctx, err, true)
	}
	defer m.lock.StopRenewer()
	if err := m.prelock(); err != nil {
		return m.abort(ctx, err, true)
	}
	// In the namespace once, before the freeze: the raw sockets for crafted
	// segments (not fatal: restore tries again when a connection needs
	// them), and what a new socket has there, so that restores write only
	// the options that differ (repair.Defaults; not fatal: without, all are
	// written).
	var injErr, defErr error
	err = nsdo.Do(cfg.NetNS, func() error {
		injErr = m.rs.open(m.lock.BypassMark())
		m.rs.r.Defaults, defErr = repair.ReadDefaults()
		return nil
	})
	if err := errors.Join(err, injErr); err != nil {
		m.log.Warn("could not open the raw sockets for crafted segments before the freeze", "err", err)
	}
	if err := errors.Join(err, defErr); err != nil {
		m.log.Warn("could not read the default socket options", "err", err)
	}
	if m.link.Version() >= 2 {
		// The source locks nothing before this: the set-up above is not
		// part of any freeze.
		if err := m.link.Control().Send(ctx, &transport.Ready{Migration: m.id}); err != nil {
			return m.abort(ctx, err, true)
		}
		// While the source holds and drains its connections, the sockets
		// they will be restored on are made, up to the first snapshot.
		m.startBlanks()
		defer func() {
			m.log.Debug("sockets made before the freeze", "made", m.blanks.made.Load(), "preset_failed", m.blanks.unpreset.Load())
			m.blanks.release()
		}()
	}

	msgs, recvErr := make(chan transport.Message, 16), make(chan error, 1)
	go func() {
		for {
			msg, err := m.link.Control().Recv(ctx)
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case msgs <- msg:
				continue
			default:
			}
			// msgs is full: wait for room, unless the link is gone (then
			// nobody will read it; say why the messages stopped).
			select {
			case msgs <- msg:
			case <-m.link.Done():
				recvErr <- m.link.Err()
				return
			}
		}
	}()

	deadline := time.Now().Add(pol.PrepareTimeout)
	pctx, pcancel := context.WithDeadline(ctx, deadline)
	err = m.prepare(pctx, msgs, recvErr)
	pcancel()
	if err != nil {
		// By the clock: a stream's deadline may fire before pctx's.
		if ctx.Err() == nil && !time.Now().Before(deadline) {
			err = fmt.Errorf("%w: the migration was not prepared within %s: %v", ErrTimeout, pol.PrepareTimeout, err)
		}
		return m.abort(ctx, err, true)
	}
	m.state = StatePrepared
	decide := time.NewTimer(pol.CommitTimeout)
	defer decide.Stop()
	// Wait for the switch and the commit (or an abort, or the end of the link).
	for {
		var msg transport.Message
		select {
		case msg = <-msgs:
		case err := <-recvErr:
			return m.abort(ctx, fmt.Errorf("target: link lost while %s: %w", m.state, err), false)
		case <-ctx.Done():
			return m.abort(ctx, ctx.Err(), true)
		case <-decide.C:
			return m.abort(ctx, fmt.Errorf("%w: no commit within %s of prepared", ErrTimeout, pol.CommitTimeout), true)
		}
		switch msg := msg.(type) {
		case *transport.Switch:
			if err := m.claim(ctx, msg.Addrs); err != nil {
				return m.abort(ctx, err, true)
			}
			m.state = StateSwitched
			if err := m.link.Control().Send(ctx, &transport.Switched{Migration: m.id}); err != nil {
				return m.abort(ctx, err, false)
			}
		case *transport.Listeners:
			if err := m.listen(ctx, msg); err != nil {
				return m.abort(ctx, err, true)
			}
		case *transport.Commit:
			return m.commit(ctx, msg)
		case *transport.Abort:
			return m.abort(ctx, fmt.Errorf("target: the source aborted: %s: %s", msg.Code, msg.Reason), false)
		default:
			return m.abort(ctx, fmt.Errorf("target: unexpected %s while %s", msg.Type(), m.state), true)
		}
	}
}

// record is one received snapshot record.
type record struct {
	index uint32
	pass  transport.Pass
	snap  *repair.Snapshot
	state []byte
}

// prepare receives every snapshot, restores what policy allows, and sends
// the verdicts and Prepared.
func (m *migration) prepare(ctx context.Context, msgs chan transport.Message, recvErr chan error) error {
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	recs := make(chan record, 256)
	readErr := make(chan error, 1)
	go func() { readErr <- m.readStreams(pctx, recs) }()

	var done uint32
	var ok uint32
	var last []transport.Verdict // the last batch's verdicts, sent with PREPARED
	// The pre-copies restored, and how many the source said it wrote
	// (PRECOPIED): the target answers PRECOPY_DONE once it has them all.
	var preDone, preWant uint32
	preAsked := false
	answerPre := func() error {
		if !preAsked || preDone < preWant {
			return nil
		}
		preAsked = false
		return m.link.Control().Send(ctx, &transport.PrecopyDone{Migration: m.id, Count: preDone})
	}
	batch := make([]record, 0, 256)
	for done < m.count {
		batch = batch[:0]
		select {
		case r := <-recs:
			batch = append(batch, r)
		case err := <-readErr:
			if err != nil {
				return err
			}
			readErr = nil // all streams ended; the records are in recs
			if len(recs) == 0 && done < m.count {
				return fmt.Errorf("target: streams ended after %d of %d connections", done, m.count)
			}
			continue
		case msg := <-msgs:
			if l, ok := msg.(*transport.Listeners); ok {
				if err := m.listen(ctx, l); err != nil {
					return err
				}
				continue
			}
			if p, ok := msg.(*transport.Precopied); ok {
				if p.Count > m.count || preWant != 0 {
					return fmt.Errorf("target: PRECOPIED of %d pre-copies, for %d connections (or a second one)", p.Count, m.count)
				}
				preWant, preAsked = p.Count, true
				if err := answerPre(); err != nil {
					return err
				}
				continue
			}
			if a, isAbort := msg.(*transport.Abort); isAbort {
				return fmt.Errorf("target: the source aborted: %s: %s", a.Code, a.Reason)
			}
			return fmt.Errorf("target: unexpected %s while preparing", msg.Type())
		case err := <-recvErr:
			return fmt.Errorf("target: link lost while preparing: %w", err)
		case <-ctx.Done():
			return ctx.Err()
		}
	drain:
		for len(batch) < cap(batch) {
			select {
			case r := <-recs:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		if err := m.fault(StepRestore); err != nil {
			return err
		}
		held := m.adm.cost(batch)
		vs, err := m.restoreBatch(batch)
		m.adm.buf.release(held)
		if err != nil {
			return err
		}
		for _, v := range vs {
			if v.OK() {
				ok++
			}
		}
		fin := finals(batch)
		done += fin
		preDone += uint32(len(batch)) - fin
		if err := answerPre(); err != nil {
			return err
		}
		if len(vs) == 0 {
			continue // pre-copies only
		}
		if done >= m.count {
			last = vs
			break
		}
		if err := m.link.Control().Send(ctx, &transport.Verdicts{Migration: m.id, Verdicts: vs}); err != nil {
			return err
		}
	}
	if err := m.fault(StepPrepared); err != nil {
		return err
	}
	prepared := &transport.Prepared{Migration: m.id, Count: m.count, OK: ok}
	if last == nil {
		return m.link.Control().Send(ctx, prepared)
	}
	// The last verdicts with PREPARED, in one write: one frame and one
	// wake-up of the source, not two.
	return m.link.Control().Send(ctx, &transport.Verdicts{Migration: m.id, Verdicts: last}, prepared)
}

// readStreams accepts snapshot streams and forwards their records until
// every connection has arrived. It returns the first error of any stream
// as soon as it happens (a stream that fails is not left unnoticed while
// another is awaited), and returns only once every goroutine it started
// has ended.
func (m *migration) readStreams(ctx context.Context, recs chan<- record) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	allIn := make(chan struct{}) // closed when the last record is in recs
	if m.count == 0 {
		close(allIn)
	}
	var got atomic.Uint32
	// The acceptor and each stream's reader send at most one error each.
	errs := make(chan error, maxStreams+1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for streams := 0; ; streams++ {
			r, err := m.link.AcceptSnapshotStream(ctx)
			if err != nil {
				errs <- err
				return
			}
			if streams == maxStreams {
				r.Close()
				errs <- fmt.Errorf("%w: more than %d snapshot streams", ErrOverLimit, maxStreams)
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer r.Close()
				for {
					rec, err := r.NextRecord()
					if err == io.EOF {
						return
					}
					if err != nil {
						errs <- err
						return
					}
					if rec.Index >= m.count {
						errs <- fmt.Errorf("target: connection index %d of %d", rec.Index, m.count)
						return
					}
					// Wait for room, then hand the record on; give up
					// when the prepare phase ends.
					if m.adm.buf.acquire(ctx, int64(queueBytes(rec.Snap, rec.State))) != nil {
						return
					}
					select {
					case recs <- record{index: rec.Index, pass: rec.Pass, snap: rec.Snap, state: rec.State}:
					case <-ctx.Done():
						return
					}
					// A pre-copy is not one of the count: its connection
					// has a final or confirming record to come.
					if rec.Pass != transport.PassPre && got.Add(1) == m.count {
						close(allIn)
						// Let prepare restore it first: otherwise this
						// goroutine goes on to read the stream's end and
						// close it (a write through yamux), and the
						// restore of the last record waited behind that
						// (35-55 µs in the bench, one connection).
						runtime.Gosched()
					}
				}
			}()
		}
	}()
	select {
	case err := <-errs:
		return err
	case <-allIn:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// finals counts the records of batch that settle their connection: every
// one but the pre-copies.
func finals(batch []record) uint32 {
	n := uint32(0)
	for _, r := range batch {
		if r.pass != transport.PassPre {
			n++
		}
	}
	return n
}

// restoreBatch restores a batch's pre-copies, then its other records, and
// returns the verdicts of the latter. A pre-copy comes before its
// connection's other record in its stream, and so in recs: splitting the
// batch keeps that order for each connection.
func (m *migration) restoreBatch(batch []record) ([]transport.Verdict, error) {
	isPre := func(r record) bool { return r.pass == transport.PassPre }
	if !slices.ContainsFunc(batch, isPre) {
		return m.restoreRecords(batch, false) // the records after the lock
	}
	var pre, rest []record
	for _, r := range batch {
		if r.pass == transport.PassPre {
			pre = append(pre, r)
		} else {
			rest = append(rest, r)
		}
	}
	if len(pre) > 0 {
		if _, err := m.restoreRecords(pre, true); err != nil {
			return nil, err
		}
	}
	if len(rest) == 0 {
		return nil, nil
	}
	return m.restoreRecords(rest, false)
}

// restoreRecords checks records against the policy, locks the allowed ones
// in one transaction and restores them. Pre-copies (pre) are kept without a
// verdict. Of the others, a confirmation settles its pre-copy as it stands;
// a final record replaces the pre-copy of its connection, if there was one
// (its socket is discarded, and its admission undone). It returns the
// verdicts of the records that are not pre-copies.
func (m *migration) restoreRecords(batch []record, pre bool) ([]transport.Verdict, error) {
	cfg := &m.srv.cfg
	var lockList []firewall.Tuple
	todo := make([]*conn, 0, len(batch))
	// One allocation for the batch's bookkeeping, not one per connection:
	// this runs inside the freeze.
	slab := make([]conn, len(batch))
	for i, r := range batch {
		if old := m.conns[r.index]; old != nil {
			// The link lets through only a confirmation or a final record
			// after a pre-copy, and nothing after those.
			if !old.pre {
				return nil, fmt.Errorf("target: a second record settles connection %d", r.index)
			}
			old.pre = false
			if r.pass == transport.PassConfirm {
				old.precopied = true
				continue
			}
			// The pre-copy is stale: the connection moved before the lock.
			if old.fd >= 0 {
				if err := repair.Discard(old.fd); err != nil {
					m.log.Warn("discarding a stale pre-copy", "conn", r.index, "err", err)
				}
				old.fd = -1
			}
			m.adm.forget(r.index, old.tuple, old.admitted)
		} else if r.pass == transport.PassConfirm {
			return nil, fmt.Errorf("target: connection %d confirmed without its pre-copy", r.index)
		}
		c := &slab[i]
		*c = conn{snap: r.snap, appState: r.state, fd: -1, pre: pre}
		l, rem := r.snap.Tuple()
		c.tuple = firewall.Tuple{Local: l, Remote: rem}
		c.report = ConnReport{Index: r.index, Local: r.snap.Local, Remote: r.snap.Remote}
		m.conns[r.index] = c
		if err := m.adm.admit(r.index, r.snap, r.state); err != nil {
			c.report.Verdict, c.report.Err = verdictOf(err), err
			continue
		}
		c.admitted = queueBytes(r.snap, r.state)
		todo = append(todo, c)
		// Tuples locked before the freeze (prelock) are not locked again.
		if !m.isPrelocked(r.index, c.tuple) {
			lockList = append(lockList, c.tuple)
		}
	}
	if len(lockList) > 0 {
		if err := m.lock.Lock(lockList); err != nil {
			return nil, err
		}
	}
	if !pre {
		// The freeze has begun: no more Blanks are made (their maker
		// would compete with the restores for the cores). Pre-copies come
		// before it, while the maker may still be ahead of them.
		m.blanks.halt()
	}
	// Both cores, each restoring in the namespace on its own thread, in
	// chunks handed to whichever is free: the next batch waits for the
	// slower of the two.
	err := shares.Chunks(len(todo), minShare, chunk, func(chunks iter.Seq2[int, int]) error {
		return nsdo.Do(cfg.NetNS, func() error {
			for lo, hi := range chunks {
				m.restoreChunk(todo[lo:hi])
			}
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	if pre {
		return nil, nil // the verdicts wait for each connection's next record
	}
	vs := make([]transport.Verdict, 0, len(batch))
	var unlock []firewall.Tuple
	for _, r := range batch {
		c := m.conns[r.index]
		v := transport.Verdict{Index: r.index, Code: c.report.Verdict}
		if c.report.Err != nil {
			v.Reason = c.report.Err.Error()
			m.log.Info("connection refused", "conn", r.index, "reason", v.Reason)
			if refusal := (*Refusal)(nil); !errors.As(c.report.Err, &refusal) {
				unlock = append(unlock, c.tuple) // locked, then the restore failed
			} else if _, held := m.adm.tuples[c.tuple]; m.isPrelocked(r.index, c.tuple) && !held {
				// Locked before the freeze, then refused: let it go,
				// unless another connection of the same tuple holds it.
				unlock = append(unlock, c.tuple)
				m.prelocked[r.index] = false
			}
			// Only the report is kept of a connection the target does not hold.
			c.snap.RecvQueue, c.snap.SendQueue, c.appState = nil, nil, nil
		}
		vs = append(vs, v)
	}
	if len(unlock) > 0 {
		// The source keeps these: the target lets go of their tuples.
		if err := m.lock.Unlock(unlock); err != nil {
			return nil, err
		}
	}
	return vs, nil
}

// startBlanks starts making the sockets of the connections PREPARE
// announced (blanks.go). The maker has a Restorer of its own: the
// restores' may get its injector meanwhile (restorer.open).
func (m *migration) startBlanks() {
	m.blanks = startBlanks(m.srv.cfg.NetNS, &repair.Restorer{Defaults: m.rs.r.Defaults}, m.announced, m.presets, m.prelocked)
}

// restoreChunk restores the admitted connections cs, each on its Blank if
// one was made, recording the outcome in each connection. It runs in the
// target's network namespace.
func (m *migration) restoreChunk(cs []*conn) {
	for _, c := range cs {
		b := m.blanks.take(c.report.Index)
		premade := b.Fits(c.snap)
		fd, err := m.rs.restore(b, c.snap, m.lock.BypassMark())
		if err != nil {
			c.report.Verdict, c.report.Err = transport.VerdictFailed, err
			if errors.Is(err, unix.EADDRINUSE) || errors.Is(err, unix.EADDRNOTAVAIL) {
				c.report.Verdict = transport.VerdictConflict
			}
			continue
		}
		c.fd, c.report.Verdict, c.report.Premade = fd, transport.VerdictOK, premade
		// The queues are in the kernel now; keep only what Resume needs.
		c.snap.RecvQueue, c.snap.SendQueue = nil, nil
	}
}

// prelock locks, in one batch, the 4-tuples PREPARE listed whose local
// address and port the policy allows (the rest of the policy applies to
// each snapshot as it arrives), so that the batches of the restore need
// no lock of their own inside the freeze.
func (m *migration) prelock() error {
	pol := &m.srv.guard.pol
	var ts []firewall.Tuple
	seen := map[firewall.Tuple]bool{}
	m.prelocked = make([]bool, len(m.announced))
	for i, a := range m.announced {
		l, r := unmap(a.Local), unmap(a.Remote) // IPv4-mapped for an AF_INET6 socket
		if !l.IsValid() || !r.IsValid() || l.Addr().Is4() != r.Addr().Is4() || l.Port() == 0 || r.Port() == 0 ||
			!pol.allowedAddr(l.Addr()) || len(pol.AllowPorts) > 0 && !slices.Contains(pol.AllowPorts, l.Port()) {
			continue
		}
		t := firewall.Tuple{Local: l, Remote: r}
		if !seen[t] {
			seen[t] = true
			m.prelocked[i] = true
			ts = append(ts, t)
		}
	}
	if len(ts) == 0 {
		return nil
	}
	return m.lock.Lock(ts)
}

// isPrelocked reports whether connection i's tuple t was locked by prelock:
// PREPARE announced t at index i (a source may announce what it likes; the
// snapshot's tuple is what counts).
func (m *migration) isPrelocked(i uint32, t firewall.Tuple) bool {
	return int(i) < len(m.prelocked) && m.prelocked[i] &&
		unmap(m.announced[i].Local) == t.Local && unmap(m.announced[i].Remote) == t.Remote
}

// unmap returns ap with an IPv4-mapped address as plain IPv4, the form of
// the lock's tuples (repair.Snapshot.Tuple).
func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func (m *migration) claim(ctx context.Context, addrs []netip.Prefix) error {
	if err := m.fault(StepSwitch); err != nil {
		return err
	}
	if m.srv.cfg.Claim == nil {
		return nil
	}
	m.claimed, m.didClaim = addrs, true
	return m.srv.cfg.Claim(ctx, addrs)
}

// commit unlocks, resumes and delivers every prepared connection the source
// did not exclude, records the outcome and answers Committed. Once here the
// commit runs to its end even if the link is gone.
func (m *migration) commit(ctx context.Context, msg *transport.Commit) (*Report, error) {
	start := time.Now() // COMMIT's arrival: the origin of the offsets in Committed
	m.state = StateCommitting
	// No journal write here: a target that dies before its sockets are live
	// has lost only repair-mode copies, which is what "preparing" already
	// says (recordedState). The write would only lengthen the freeze.
	// The connections the source rolled back are discarded; their tuples
	// stay dropped until the table goes. (An index it names that the
	// target refused, or names twice, holds no socket.)
	keep := false // a tuple of the lock must stay dropped after the commit
	for _, i := range msg.Exclude {
		if i < m.count {
			if c := m.conns[i]; c != nil && c.fd >= 0 {
				repair.Discard(c.fd)
				c.fd = -1
				keep = true
			}
		}
	}
	// The connections the source captured after its lock first (first):
	// those that were busy (waves, in the source), whose peers are
	// sending; then those of them taken from a listener's accept queue,
	// which go to the application with their listeners; then the
	// confirmed copies.
	var first, pending, copied []*conn
	for _, c := range m.conns {
		switch {
		case c == nil || c.fd < 0:
		case c.precopied:
			copied = append(copied, c)
		case m.isPending(c):
			pending = append(pending, c)
		default:
			first = append(first, c)
		}
	}
	live := slices.Concat(first, pending, copied)
	var failed []transport.Verdict
	fail := func(c *conn, err error) {
		c.report.Verdict, c.report.Err = transport.VerdictFailed, err
		failed = append(failed, transport.Verdict{Index: c.report.Index, Code: transport.VerdictFailed, Reason: err.Error()})
	}
	// A half-closed connection restored before its address was local
	// still needs its crafted segments; the address is local now (the
	// switch is done) and the lock still holds. One that fails is
	// discarded, and unlocked with the others.
	for _, c := range live {
		if err := m.rs.r.Settle(c.fd, c.snap); err != nil {
			repair.Discard(c.fd)
			c.fd = -1
			fail(c, err)
		}
	}
	// Nothing is live here yet: if the sockets cannot be unlocked, the
	// target backs out as if aborted (its copies are in repair mode, so
	// discarding them is silent) and says so; the source, finding the
	// migration aborted, takes every connection back.
	err := m.fault(StepCommit)
	if err == nil {
		if !keep {
			// Every tuple the lock still holds is one of these
			// connections' (refused ones were let go when refused, failed
			// restores too; an exclusion the target had refused itself
			// holds nothing): they are let go in one batch whatever their
			// number, where Unlock costs some 6.5 ms per 10,000 inside
			// the freeze.
			err = m.lock.Release()
		} else {
			tuples := make([]firewall.Tuple, len(live))
			for i, c := range live {
				tuples[i] = c.tuple
			}
			err = m.lock.Unlock(tuples)
		}
	}
	gone := func(c *conn) bool { return c.fd < 0 }
	live, first = slices.DeleteFunc(live, gone), slices.DeleteFunc(first, gone)
	if err != nil {
		m.log.Error("commit failed before any socket was resumed: backing out", "err", err)
		return m.abort(ctx, fmt.Errorf("target: commit: %w", err), true)
	}
	// From here the connections are the target's: a query says committed.
	m.srv.record(m.id, transport.StateCommitted)
	// When each connection's freeze ended, for the source's report.
	resumedUs := make([]uint32, m.count)
	// When the application takes them in waves, first (at the head of
	// live) goes to it before the others are woken; otherwise all go
	// together once all are live.
	groups := [][]*conn{live}
	if m.srv.cfg.DeliverWaves && 0 < len(first) && len(first) < len(live) {
		groups = [][]*conn{first, live[len(first):]}
	}
	var (
		delivered     []*Delivered
		jerr, derr    error
		fails         = make([]map[uint32]error, len(groups))
		firstDelivery sync.WaitGroup
	)
	for g, group := range groups {
		ds := m.resume(group, start, resumedUs, fail)
		delivered = append(delivered, ds...)
		if g == 0 {
			// The sockets are live: the record says so before anyone else
			// has them. Not synced: it answers for the agent's crash; a
			// crash of the machine takes the live sockets (and /run) with
			// it (docs/faults.md).
			m.rec.State = StateCommitted.String()
			jerr = m.srv.jr.Update(&m.rec)
			derr = m.fault(StepDeliver)
		}
		switch {
		case derr != nil:
			// Closed below, the connections live and owned by nobody.
		case g < len(groups)-1:
			if len(ds) == 0 {
				break // none of them could be resumed
			}
			// The application takes these while the others wake.
			firstDelivery.Add(1)
			go func() {
				defer firstDelivery.Done()
				fails[g] = m.deliver(ctx, ds, false)
			}()
		default:
			firstDelivery.Wait() // Deliver is never called twice at once
			if len(ds) > 0 || m.lsn != nil {
				fails[g] = m.deliver(ctx, ds, true)
			}
		}
	}
	if derr != nil {
		for _, d := range delivered {
			fail(m.conns[d.Index], derr)
			d.File.Close() // the connection is live and owned by nobody: closing it ends it cleanly
		}
		delivered = nil
		m.closeListeners()
	}
	for _, f := range fails {
		for i, err := range f {
			fail(m.conns[i], err)
		}
	}
	for _, d := range delivered {
		if c := m.conns[d.Index]; c.report.Err == nil {
			c.report.Delivered = true
		}
	}
	m.state = StateCommitted
	// Answer first: the source is waiting; the bookkeeping can follow.
	answer := &transport.Committed{Migration: m.id, Failed: failed, Resumed: resumedUs}
	answer.Elapsed = time.Since(start)
	if err := m.link.Control().Send(ctx, answer); err != nil {
		m.log.Warn("could not answer Committed; the source will ask", "err", err)
	}
	lerr := m.lock.Close()
	return m.report(), errors.Join(jerr, lerr, m.rs.close(), m.closeListeners())
}

// resume ends the freeze of each connection of live, which the commit has
// unlocked, and returns them ready for the application; a connection that
// cannot be resumed is discarded and reported through fail. Both cores
// work, in three passes. The first ends each connection's freeze
// (Restorer.Wake: repair off, then the kick or probe), in chunks handed to
// whichever core is free, in order, so that live[0] is woken first and
// both cores finish together; resumedUs records when, from start. The
// second acknowledges what the held peers sent at their kick
// (repair.AckNow), puts back what leaving repair cleared (repair.Finish)
// and makes the Files (a name formatted, fcntl and epoll_ctl each): none of
// it lengthens a freeze, since every connection of live is awake by then.
// The third acknowledges again, for the bursts that came later.
func (m *migration) resume(live []*conn, start time.Time, resumedUs []uint32, fail func(*conn, error)) []*Delivered {
	resumed := make([]*Delivered, len(live))
	errs := make([]error, len(live))
	shares.Chunks(len(live), minShare, chunk, func(chunks iter.Seq2[int, int]) error {
		for lo, hi := range chunks {
			for i := lo; i < hi; i++ {
				c := live[i]
				// A held connection is kicked here too: its peer waits at
				// window 0 until then, so its freeze ends after the kick,
				// not at the repair-off before it.
				err := m.rs.r.Wake(c.fd, c.snap)
				if err == nil || errors.Is(err, repair.ErrResumedLive) {
					resumedUs[c.report.Index] = uint32(max(1, time.Since(start).Microseconds()))
				}
				errs[i] = err
			}
		}
		return nil
	})
	shares.Run(len(live), minShare, func(lo, hi int) error {
		for i := lo; i < hi; i++ {
			c := live[i]
			err := errs[i]
			if err != nil && !errors.Is(err, repair.ErrResumedLive) {
				continue // still in repair mode: discarded below
			}
			if err == nil && c.snap.Flags&repair.FlagHeld != 0 {
				// The peer answered its kick with a burst that fills the
				// restored window (a peer on this host within the kick's
				// system call); nobody reads yet, so the kernel would hold
				// its ACK for the delayed-ACK timer, 40 ms or more.
				repair.AckNow(c.fd)
			}
			if err = errors.Join(err, repair.Finish(c.fd, c.snap)); err != nil {
				// Live despite the error (a lost kick or probe, an option
				// not put back): it is delivered like the others.
				m.log.Warn("connection resumed with a lost finishing step", "conn", c.report.Index, "err", err)
			}
			errs[i] = nil
			resumed[i] = &Delivered{File: os.NewFile(uintptr(c.fd), "tcp:"+c.tuple.String()),
				Local: c.snap.Local, Remote: c.snap.Remote, AppState: c.appState, Migration: m.id, Index: c.report.Index}
		}
		return nil
	})
	// Again, for the bursts that were not in at the second pass (a peer a
	// round trip away): they have had that pass's time to arrive.
	shares.Run(len(live), minShare, func(lo, hi int) error {
		for i := lo; i < hi; i++ {
			if c := live[i]; errs[i] == nil && c.snap.Flags&repair.FlagHeld != 0 {
				repair.AckNow(c.fd)
			}
		}
		return nil
	})
	var delivered []*Delivered
	for i, c := range live {
		if err := errs[i]; err != nil {
			// Still in repair mode (repair.Resume's contract): it never
			// went live here, and closing it so is silent.
			repair.Discard(c.fd)
			c.fd = -1
			fail(c, err)
			continue
		}
		delivered = append(delivered, resumed[i])
		c.fd = -1
	}
	return delivered
}

// abort discards every restored socket, releases the locks and the claimed
// identity, and records the outcome. tell says whether the source should be
// sent an Abort (it is not when the source asked for it or the link is gone).
func (m *migration) abort(ctx context.Context, cause error, tell bool) (*Report, error) {
	m.log.Warn("aborting", "err", cause)
	if tell {
		actx, cancel := context.WithTimeout(context.Background(), time.Second)
		m.link.Control().Send(actx, &transport.Abort{Migration: m.id, Code: abortCode(cause), Reason: cause.Error()})
		cancel()
	}
	var errs []error
	for _, c := range m.conns {
		if c != nil && c.fd >= 0 {
			errs = append(errs, repair.Discard(c.fd))
			c.fd = -1
		}
	}
	if m.didClaim && m.srv.cfg.Unclaim != nil {
		errs = append(errs, m.srv.cfg.Unclaim(ctx, m.claimed))
	}
	if m.lock != nil {
		errs = append(errs, m.lock.Close())
	}
	errs = append(errs, m.rs.close())
	errs = append(errs, m.closeListeners())
	m.state = StateAborted
	// Recorded last: a source that asks learns "aborted" only once the
	// identity is released here, so it may take it back without a clash.
	m.srv.record(m.id, transport.StateAborted)
	if m.rec.Migration != "" {
		m.rec.State = StateAborted.String()
		errs = append(errs, m.srv.jr.Update(&m.rec))
	}
	return m.report(), errors.Join(append([]error{cause}, errs...)...)
}

// minShare is the fewest connections worth a goroutine of their own
// (internal/shares): below it, the goroutine costs more than the second
// core gives.
const minShare = 16

// chunk is how many connections a core takes at a time when the target
// restores or wakes a batch on both (shares.Chunks): small enough that
// both finish within a few hundred microseconds of each other, large
// enough that handing out costs nothing.
const chunk = 32
