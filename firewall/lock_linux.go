package firewall

import (
	"errors"
	"slices"
	"sync"
	"time"
	"unsafe"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// leaseMargin is how close to its deadline a lease counts as possibly
// lapsed: the kernel may expire the elements before a batch sent now is
// processed. Tuples that close are handled with an extra add that makes the
// batch valid whether or not the kernel still has them.
const leaseMargin = 250 * time.Millisecond

// Lock is the connection lock of one agent instance in one network
// namespace: a private nftables table whose chains drop every TCP packet of
// the locked 4-tuples, in both directions, except those carrying the bypass
// mark.
//
// Each method that changes the lock sends one netlink batch, which the
// kernel applies atomically: every tuple of a call is locked (or unlocked)
// at the same instant, or none is. A Lock is safe for concurrent use; its
// calls are applied one at a time.
type Lock struct {
	*instance

	// mu guards everything below, and serialises the batches so that held
	// follows the kernel's order of changes. (While Lock waits for the
	// kernel, its helper goroutine works on held and undo for it.)
	mu       sync.Mutex
	held     map[conn]holding // made by the first Lock
	gen      uint64           // numbers the calls, to spot a tuple named twice in one
	closed   bool
	released bool      // Release removed the rules: nothing can be locked
	sock     *nfSocket // lasting netlink socket, dialled by New or next use
	tx       changes   // the keys of the batch being built
	b        batch     // its encoding
	undo     []undo    // how to restore held if the batch fails

	canHold  bool               // the table has the hold sets and rule
	holds    map[conn]time.Time // tuples held with a zero window, and their deadline
	holdUndo []holdUndo         // how to restore holds if the batch fails

	// renewMu guards renewer.
	renewMu sync.Mutex
	renewer *renewer
}

// holding is what the Lock knows of one locked tuple in the kernel.
type holding struct {
	// deadline is the earliest instant the kernel may expire the tuple's
	// element: the start of the call that last (re)created it plus the
	// lease.
	deadline time.Time
	// gen is the call that last changed the entry.
	gen uint64
}

// undo is the state of one entry of held before the current call.
type undo struct {
	c   conn
	h   holding
	had bool
}

// New creates the lock of cfg.Instance in cfg.NetNS: the table, both sets,
// both chains and their rules, in one batch. It fails with ErrExists if a
// live process holds the instance or if its table is left over from a dead
// one (Sweep removes those). It needs CAP_NET_ADMIN in the namespace.
//
// The instance is held through an abstract unix socket named after the
// table, bound in the same namespace; the kernel releases it when the
// process exits, however it exits, which is how Sweep tells live instances
// from dead ones.
func New(cfg Config) (*Lock, error) {
	l := &Lock{}
	err := claim("new", cfg, func(in *instance) error {
		l.instance = in
		err := l.create(in.cfg.Hold)
		if err != nil && in.cfg.Hold && !errors.Is(err, unix.EEXIST) {
			// The kernel refused the hold's rule (payload writes with
			// checksum update): the lock works without it.
			return l.create(false)
		}
		l.canHold = err == nil && in.cfg.Hold
		return err
	})
	if err != nil {
		return nil, err
	}
	// Dial the lasting socket now (some 20 µs: a thread entering the
	// namespace, the socket and its setup), so that the first batch, the
	// source's Hold or Lock or the target's prelock, does not wait for it.
	// If it fails, the first use tries again and reports it.
	l.socket()
	return l, nil
}

var (
	keyType4 = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService, nftables.TypeIPAddr, nftables.TypeInetService)
	keyType6 = nftables.MustConcatSetType(nftables.TypeIP6Addr, nftables.TypeInetService, nftables.TypeIP6Addr, nftables.TypeInetService)
)

// create builds the table, with the hold's sets and rule if hold is set.
func (l *Lock) create(hold bool) error {
	tbl := l.nftTable()
	v4 := &nftables.Set{Table: tbl, Name: setV4, ID: 1, KeyType: keyType4,
		HasTimeout: true, Timeout: l.cfg.Lease, Concatenation: true}
	v6 := &nftables.Set{Table: tbl, Name: setV6, ID: 2, KeyType: keyType6,
		HasTimeout: true, Timeout: l.cfg.Lease, Concatenation: true}
	sets := []*nftables.Set{v4, v6}
	in := chainSpec{name: chainIn, hook: nftables.ChainHookPrerouting}
	out := chainSpec{name: chainOut, hook: nftables.ChainHookOutput}
	for _, s := range sets {
		// First the rule for the packets a chain mostly sees: those to
		// the local end on input, those from it on output.
		in.rules = append(in.rules, dropRule(s, toLocal), dropRule(s, fromLocal))
		out.rules = append(out.rules, dropRule(s, fromLocal), dropRule(s, toLocal))
	}
	if hold {
		for _, s := range holdSets(tbl, l.cfg.Lease) {
			sets = append(sets, s)
			out.rules = append(out.rules, holdRule(s))
		}
	}
	return l.createTable(tbl, sets, []chainSpec{in, out})
}

// bypassRule is "meta mark == mark accept".
func bypassRule(mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
}

// order is the order in which a drop rule concatenates a packet's
// endpoints to look them up as local·lport·remote·rport.
type order bool

const (
	fromLocal order = false // saddr . sport . daddr . dport: the packet leaves the local end
	toLocal   order = true  // daddr . dport . saddr . sport: the packet goes to the local end
)

// dropRule is "meta nfproto F meta l4proto tcp
// ip[6] saddr . tcp sport . ip[6] daddr . tcp dport @set counter drop", or
// with daddr . dport . saddr . sport for toLocal. The concatenation is
// loaded into consecutive 32-bit registers starting at register 1
// (NFT_REG32_00), as nft does, each port padded to 4 bytes.
func dropRule(s *nftables.Set, o order) []expr.Any {
	return append(lookupExprs(s, o), &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop})
}

// lookupExprs match a TCP packet of the family of set s whose endpoints,
// concatenated in order o, are in s.
func lookupExprs(s *nftables.Set, o order) []expr.Any {
	proto, alen, src, dst := byte(unix.NFPROTO_IPV4), uint32(4), uint32(12), uint32(16)
	if s.KeyType.Bytes == keyType6.Bytes {
		proto, alen, src, dst = unix.NFPROTO_IPV6, 16, 8, 24
	}
	sport, dport := uint32(0), uint32(2)
	if o == toLocal {
		src, dst, sport, dport = dst, src, dport, sport
	}
	const reg32 = 8 // NFT_REG32_00
	words := alen / 4
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: alen},
		&expr.Payload{DestRegister: reg32 + words, Base: expr.PayloadBaseTransportHeader, Offset: sport, Len: 2},
		&expr.Payload{DestRegister: reg32 + words + 1, Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: alen},
		&expr.Payload{DestRegister: reg32 + 2*words + 1, Base: expr.PayloadBaseTransportHeader, Offset: dport, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID},
	}
}

// BypassMark returns the packet mark that passes the lock. Packets the
// agent crafts must carry exactly this mark (SO_MARK).
func (l *Lock) BypassMark() uint32 { return l.cfg.BypassMark }

// Lease returns the lease of each locked tuple.
func (l *Lock) Lease() time.Duration { return l.cfg.Lease }

// Table returns the name of the lock's nftables table.
func (l *Lock) Table() string { return l.table }

// Lock drops every packet of each tuple, both directions, from the moment
// the batch commits, for one lease (renew it with Renew or StartRenewer).
// Tuples already locked stay locked and keep their lease; a tuple whose
// lease ran out is locked afresh. An invalid tuple fails the whole call
// before anything is sent (ErrInvalidTuple).
func (l *Lock) Lock(ts []Tuple) error {
	cs, err := collect("lock", l.table, ts)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return &Error{Op: "lock", Table: l.table, Err: ErrClosed}
	}
	if l.released {
		return &Error{Op: "lock", Table: l.table, Err: ErrReleased}
	}
	start := l.startCall()
	l.unheld(cs, start)
	l.tx.add.reserve(cs)
	for _, c := range cs {
		l.tx.add.put(c) // a tuple named twice is added twice: the kernel ignores the second
	}
	// The batch does not depend on held: update held on the other core
	// while the kernel works through the batch (for 10,000 tuples some
	// 1.5 ms against the kernel's 15), and undo that if the batch fails.
	// The helper touches only held and undo, flush neither.
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.locked(cs, start)
	}()
	err = l.flush()
	<-done
	return l.settle("lock", err)
}

// Unlock lets the packets of each tuple through again, all at the same
// instant. Tuples this Lock does not hold are ignored. If both ends of a
// connection are locked here (a tuple and its mirror), its packets keep
// being dropped until both are unlocked.
func (l *Lock) Unlock(ts []Tuple) error {
	cs, err := collect("unlock", l.table, ts)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return &Error{Op: "unlock", Table: l.table, Err: ErrClosed}
	}
	now := l.startCall()
	l.unheld(cs, now)
	l.unlocked(cs, now)
	return l.commit("unlock")
}

// locked records in held, and how to undo it, that the batch of Lock(cs),
// started at start, locks cs.
func (l *Lock) locked(cs []conn, start time.Time) {
	if l.held == nil {
		// The first Lock makes the map, to the size of its wave: growing a
		// map entry by entry costs several times more than filling one
		// made to size. (A map emptied by Unlock keeps its room.)
		l.held = make(map[conn]holding, len(cs))
	}
	l.undo = slices.Grow(l.undo, len(cs))
	for _, c := range cs {
		h, ok := l.held[c]
		if ok && h.gen == l.gen {
			continue // named twice
		}
		l.undo = append(l.undo, undo{c, h, ok})
		// A tuple held already keeps its deadline, unless its lease ran out
		// well before this batch: then the kernel had dropped it and the
		// batch added it afresh.
		if !ok || start.Sub(h.deadline) > leaseMargin {
			h.deadline = start.Add(l.cfg.Lease)
		}
		h.gen = l.gen
		l.held[c] = h
	}
}

// unlocked puts the deletions of Unlock(cs), started at now, in the batch
// and removes cs from held, recording how to undo that.
func (l *Lock) unlocked(cs []conn, now time.Time) {
	l.undo = slices.Grow(l.undo, len(cs))
	l.tx.del.reserve(cs)
	for _, c := range cs {
		h, ok := l.held[c]
		if !ok {
			continue // not held, or named twice
		}
		l.undo = append(l.undo, undo{c, h, true})
		delete(l.held, c)
		if h.deadline.Sub(now) <= leaseMargin {
			// The kernel may have expired it: add it first so the delete
			// cannot fail with ENOENT and abort the batch.
			l.tx.guard.put(c)
		}
		l.tx.del.put(c)
	}
}

// Renew gives each tuple, which must be locked by l, a full lease from now,
// in one batch, without unlocking it even for an instant (the batch deletes
// and re-adds the elements; the kernel swaps them atomically). If a tuple is
// not locked the call fails with ErrNotLocked and nothing is renewed. If
// leases had lapsed, or were within a few hundred milliseconds of lapsing,
// those tuples are locked again and the call reports them with
// ErrLeaseLapsed after renewing everything.
func (l *Lock) Renew(ts []Tuple) error {
	cs, err := collect("renew", l.table, ts)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return &Error{Op: "renew", Table: l.table, Err: ErrClosed}
	}
	var missing []Tuple
	for _, c := range cs {
		if _, ok := l.held[c]; !ok {
			missing = append(missing, c.tuple())
		}
	}
	if missing != nil {
		return &Error{Op: "renew", Table: l.table, Tuples: missing, Err: ErrNotLocked}
	}
	return l.renew(cs)
}

// RenewAll renews every tuple l holds, as Renew does.
func (l *Lock) RenewAll() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return &Error{Op: "renew", Table: l.table, Err: ErrClosed}
	}
	cs := make([]conn, 0, len(l.held))
	for c := range l.held {
		cs = append(cs, c)
	}
	return l.renew(cs)
}

// renew runs with l.mu held; every conn of cs is in l.held.
func (l *Lock) renew(cs []conn) error {
	start := l.startCall()
	l.undo = slices.Grow(l.undo, len(cs))
	l.tx.del.reserve(cs)
	l.tx.add.reserve(cs)
	var lapsed []Tuple
	for _, c := range cs {
		h := l.held[c]
		if h.gen == l.gen {
			continue // named twice
		}
		l.undo = append(l.undo, undo{c, h, true})
		if h.deadline.Sub(start) <= leaseMargin {
			l.tx.guard.put(c)
			lapsed = append(lapsed, c.tuple())
		}
		l.tx.del.put(c)
		l.tx.add.put(c)
		l.held[c] = holding{deadline: start.Add(l.cfg.Lease), gen: l.gen}
	}
	if err := l.commit("renew"); err != nil {
		return err
	}
	if lapsed != nil {
		return &Error{Op: "renew", Table: l.table, Tuples: lapsed, Err: ErrLeaseLapsed}
	}
	return nil
}

// startCall clears the batch under construction, numbers the call and
// returns its start: deadlines count from before the batch is sent, so the
// Lock never believes a lease longer than the kernel's. It runs with l.mu
// held.
func (l *Lock) startCall() time.Time {
	l.tx.reset()
	l.undo = l.undo[:0]
	l.holdUndo = l.holdUndo[:0]
	l.gen++
	return time.Now()
}

// commit sends the batch built since startCall and settles its outcome.
// It runs with l.mu held.
func (l *Lock) commit(op string) error { return l.settle(op, l.flush()) }

// settle puts held back as it was before the call if err (the outcome of
// the call's batch) is not nil, and returns err as an *Error. It runs with
// l.mu held.
func (l *Lock) settle(op string, err error) error {
	if cap(l.b.buf) > maxKeep {
		l.b, l.tx = batch{}, changes{}
	}
	if err != nil {
		l.restoreHolds()
	}
	l.holdUndo = l.holdUndo[:0]
	if err == nil {
		l.undo = l.undo[:0]
		if cap(l.undo)*int(unsafe.Sizeof(undo{})) > maxKeep {
			l.undo = nil
		}
		return nil
	}
	for i := len(l.undo) - 1; i >= 0; i-- {
		u := l.undo[i]
		if u.had {
			l.held[u.c] = u.h
		} else {
			delete(l.held, u.c)
		}
	}
	l.undo = l.undo[:0]
	return &Error{Op: op, Table: l.table, Err: err}
}

// Release lets the packets of every tuple through at once, in one batch
// whose cost does not grow with the number of tuples: it removes the rules
// of both chains (drops, holds and the bypass), and the sets keep their
// elements until Close. Unlock of 10,000 tuples takes some 6.5 ms, Release
// about as long as Unlock of one; a target that lets go of everything it
// locked at its commit calls it inside the freeze instead of Unlock.
// Afterwards the Lock holds nothing: Lock and Hold fail with ErrReleased,
// Unlock has nothing to do, and Close deletes the table.
func (l *Lock) Release() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return &Error{Op: "release", Table: l.table, Err: ErrClosed}
	}
	if l.released {
		return nil
	}
	s, err := l.socket()
	if err == nil {
		l.b.begin(s.seq)
		l.b.flushChain(l.table, chainIn)
		l.b.flushChain(l.table, chainOut)
		l.b.end()
		err = s.send(&l.b)
	}
	if err != nil {
		l.dropSocket()
		return &Error{Op: "release", Table: l.table, Err: err}
	}
	l.released = true
	l.held = nil
	l.holds = nil
	return nil
}

// Close stops the renewer and deletes the table with every lock in it, in
// one batch, then releases the instance. It is idempotent; a table that is
// already gone is not an error. If the deletion fails, the Lock stays open
// and Close may be called again.
func (l *Lock) Close() error {
	l.StopRenewer()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	s, err := l.socket()
	if err == nil {
		l.b.begin(s.seq)
		l.b.delTable(l.table)
		l.b.end()
		err = s.send(&l.b)
	}
	if err != nil && !errors.Is(err, unix.ENOENT) {
		l.dropSocket()
		return &Error{Op: "close", Table: l.table, Err: err}
	}
	l.dropSocket()
	l.closed = true
	l.held = nil
	l.holds = nil
	l.b = batch{}
	l.tx = changes{}
	l.release()
	return nil
}

// keys accumulates the set keys of one purpose, per family.
type keys struct {
	v4, v6 []byte
}

// reserve makes room for the keys of cs.
func (k *keys) reserve(cs []conn) {
	n4 := 0
	for i := range cs {
		if cs[i].v4 {
			n4++
		}
	}
	k.v4 = slices.Grow(k.v4, n4*keyLen4)
	k.v6 = slices.Grow(k.v6, (len(cs)-n4)*keyLen6)
}

func (k *keys) put(c conn) {
	if c.v4 {
		k.v4 = c.appendKey(k.v4)
	} else {
		k.v6 = c.appendKey(k.v6)
	}
}

// changes are the element changes of one batch: guard elements are added
// first (making the following deletes valid whatever the kernel expired),
// then del elements deleted, then add elements added. The buffers are kept
// from one call to the next.
//
// The hold's keys (holdGuard, holdDel, holdAdd) change the hold sets in the
// same way and the same batch.
type changes struct {
	guard, del, add             keys
	holdGuard, holdDel, holdAdd keys
}

func (t *changes) all() []*keys {
	return []*keys{&t.guard, &t.del, &t.add, &t.holdGuard, &t.holdDel, &t.holdAdd}
}

func (t *changes) empty() bool {
	for _, k := range t.all() {
		if len(k.v4)+len(k.v6) != 0 {
			return false
		}
	}
	return true
}

func (t *changes) reset() {
	for _, k := range t.all() {
		k.v4, k.v6 = k.v4[:0], k.v6[:0]
	}
}

// maxKeep is the largest buffer a Lock keeps between calls; a larger one
// (a batch of some 100,000 tuples) is left to the garbage collector. The
// undo records are held to the same bound.
const maxKeep = 4 << 20

// flush encodes l.tx as one batch and sends it. It runs with l.mu held.
func (l *Lock) flush() error {
	if l.tx.empty() {
		return nil
	}
	s, err := l.socket()
	if err != nil {
		return err
	}
	l.encode(s.seq)
	err = s.send(&l.b)
	if err != nil {
		// It may hold replies of this batch that would be taken for
		// another's.
		l.dropSocket()
	}
	return err
}

// encode writes l.tx into l.b, starting at sequence number seq.
func (l *Lock) encode(seq uint32) {
	t, b := &l.tx, &l.b
	b.begin(seq)
	n := nlmsgHdrLen + nfgenLen // END
	for _, k := range t.all() {
		n += elementsLen(len(l.table), keyLen4, len(k.v4)) + elementsLen(len(l.table), keyLen6, len(k.v6))
	}
	b.reserve(n)
	b.elements(unix.NFT_MSG_NEWSETELEM, l.table, setV4, keyLen4, t.guard.v4)
	b.elements(unix.NFT_MSG_NEWSETELEM, l.table, setV6, keyLen6, t.guard.v6)
	b.elements(unix.NFT_MSG_NEWSETELEM, l.table, holdV4, keyLen4, t.holdGuard.v4)
	b.elements(unix.NFT_MSG_NEWSETELEM, l.table, holdV6, keyLen6, t.holdGuard.v6)
	b.elements(unix.NFT_MSG_DELSETELEM, l.table, setV4, keyLen4, t.del.v4)
	b.elements(unix.NFT_MSG_DELSETELEM, l.table, setV6, keyLen6, t.del.v6)
	b.elements(unix.NFT_MSG_DELSETELEM, l.table, holdV4, keyLen4, t.holdDel.v4)
	b.elements(unix.NFT_MSG_DELSETELEM, l.table, holdV6, keyLen6, t.holdDel.v6)
	b.elements(unix.NFT_MSG_NEWSETELEM, l.table, setV4, keyLen4, t.add.v4)
	b.elements(unix.NFT_MSG_NEWSETELEM, l.table, setV6, keyLen6, t.add.v6)
	b.elements(unix.NFT_MSG_NEWSETELEM, l.table, holdV4, keyLen4, t.holdAdd.v4)
	b.elements(unix.NFT_MSG_NEWSETELEM, l.table, holdV6, keyLen6, t.holdAdd.v6)
	b.end()
}

// socket returns the lasting netlink socket, dialling it if needed. It runs
// with l.mu held.
//
// Batches share one lasting socket because closing a netfilter netlink
// socket waits for an RCU grace period whenever a recent batch deleted
// something (the kernel flushes its deferred frees on release), which
// costs about 10 ms. A socket whose batch failed is closed and replaced.
func (l *Lock) socket() (*nfSocket, error) {
	if l.sock == nil {
		s, err := dialNF(l.nsfd)
		if err != nil {
			return nil, err
		}
		l.sock = s
	}
	return l.sock, nil
}

// dropSocket closes the lasting socket, if any. It runs with l.mu held.
func (l *Lock) dropSocket() {
	if l.sock != nil {
		l.sock.close()
		l.sock = nil
	}
}
