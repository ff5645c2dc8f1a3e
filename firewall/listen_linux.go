package firewall

import (
	"errors"
	"net/netip"
	"slices"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Object names inside a listener lock's table.
const (
	setListen4 = "l4" // ipv4_addr . inet_service: listeners on one IPv4 address
	setListen6 = "l6" // ipv6_addr . inet_service: listeners on one IPv6 address
	setPort4   = "p4" // inet_service: IPv4 listeners on every address
	setPort6   = "p6" // inet_service: IPv6 listeners on every address
)

var (
	listenKey4 = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService)
	listenKey6 = nftables.MustConcatSetType(nftables.TypeIP6Addr, nftables.TypeInetService)
)

// ListenLock keeps new connections away from listening sockets while they
// move: a private nftables table whose prerouting chain drops every inbound
// TCP SYN (SYN set; ACK, RST and FIN clear) to a locked listener's address
// and port, except packets carrying the bypass mark. Segments of existing
// connections, and handshakes already past their SYN, are not touched. A
// dropped SYN is retransmitted by the peer (after 1 s, then 3 s, ...), by
// which time the listener has moved or the lock is gone.
//
// A listener bound to the unspecified address locks its port on every
// address; an IPv6 one ([::]:P) in both families, as a dual-stack socket
// receives both. An IPv4-mapped address locks plain IPv4. Endpoints may
// thus share an element ([::]:P and 0.0.0.0:P): Unlock keeps what an
// endpoint still locked needs.
//
// Locked endpoints carry the lease of Config.Lease, renewed by
// StartRenewer, so the lock of a crashed agent lapses by itself; Close
// deletes the table. The table is named and owned like a Lock's (Sweep
// removes a dead agent's). A ListenLock is safe for concurrent use.
type ListenLock struct {
	*instance

	mu      sync.Mutex // guards the fields below
	held    []netip.AddrPort
	closed  bool
	renewer *renewer
}

// NewListenLock creates the listener lock of cfg.Instance in cfg.NetNS: the
// table, its four sets and the chain, in one batch, holding nothing. It
// fails with ErrExists like New.
func NewListenLock(cfg Config) (*ListenLock, error) {
	l := &ListenLock{}
	err := claim("new listen lock", cfg, func(in *instance) error {
		l.instance = in
		return l.create()
	})
	if err != nil {
		return nil, err
	}
	return l, nil
}

func (l *ListenLock) sets() (tbl *nftables.Table, v4, v6, p4, p6 *nftables.Set) {
	tbl = l.nftTable()
	mk := func(name string, id uint32, key nftables.SetDatatype, concat bool) *nftables.Set {
		return &nftables.Set{Table: tbl, Name: name, ID: id, KeyType: key, HasTimeout: true, Timeout: l.cfg.Lease, Concatenation: concat}
	}
	return tbl, mk(setListen4, 1, listenKey4, true), mk(setListen6, 2, listenKey6, true),
		mk(setPort4, 3, nftables.TypeInetService, false), mk(setPort6, 4, nftables.TypeInetService, false)
}

// create builds the table: the four sets and the prerouting chain.
func (l *ListenLock) create() error {
	tbl, v4, v6, p4, p6 := l.sets()
	sets := []*nftables.Set{v4, v6, p4, p6}
	in := chainSpec{name: chainIn, hook: nftables.ChainHookPrerouting}
	for _, s := range sets {
		in.rules = append(in.rules, synDropRule(s))
	}
	return l.createTable(tbl, sets, []chainSpec{in})
}

// synDropRule is "meta nfproto F meta l4proto tcp
// tcp flags & (fin|syn|rst|ack) == syn [ip[6] daddr .] tcp dport @set
// counter drop".
func synDropRule(s *nftables.Set) []expr.Any {
	proto, alen, dst := byte(unix.NFPROTO_IPV4), uint32(4), uint32(16)
	if s.Name == setListen6 || s.Name == setPort6 {
		proto, alen, dst = unix.NFPROTO_IPV6, 16, 24
	}
	const reg32 = 8 // NFT_REG32_00
	const tcpFlags, fin, syn, rst, ack = 13, 0x01, 0x02, 0x04, 0x10
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: tcpFlags, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{fin | syn | rst | ack}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{syn}},
	}
	if s.Concatenation {
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: alen},
			&expr.Payload{DestRegister: reg32 + alen/4, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2})
	} else {
		e = append(e, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2})
	}
	return append(e,
		&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	)
}

// listenKey is one element of a listener lock: its set and its key.
type listenKey struct {
	set string
	key string // the element's bytes
}

// listenKeys returns the elements that lock ep.
func listenKeys(ep netip.AddrPort) ([]listenKey, error) {
	a := ep.Addr().Unmap().WithZone("")
	if !a.IsValid() || ep.Port() == 0 {
		return nil, ErrInvalidTuple
	}
	port := string(binaryutil.BigEndian.PutUint16(ep.Port()))
	const pad = "\x00\x00" // concatenated keys pad each part to 4 bytes
	switch {
	case a.IsUnspecified() && a.Is6():
		return []listenKey{{setPort6, port}, {setPort4, port}}, nil
	case a.IsUnspecified():
		return []listenKey{{setPort4, port}}, nil
	case a.Is4():
		b := a.As4()
		return []listenKey{{setListen4, string(b[:]) + port + pad}}, nil
	default:
		b := a.As16()
		return []listenKey{{setListen6, string(b[:]) + port + pad}}, nil
	}
}

// keysOf returns the elements that lock eps, each once, less those that
// lock an endpoint of except: endpoints overlap (an IPv6 wildcard locks
// the port in both families), and a batch must neither delete an element
// twice nor one that another endpoint still needs.
func keysOf(eps, except []netip.AddrPort) ([]listenKey, error) {
	skip := map[listenKey]bool{}
	for _, ep := range except {
		ks, err := listenKeys(ep)
		if err != nil {
			return nil, err
		}
		for _, k := range ks {
			skip[k] = true
		}
	}
	var out []listenKey
	for _, ep := range eps {
		ks, err := listenKeys(ep)
		if err != nil {
			return nil, err
		}
		for _, k := range ks {
			if !skip[k] {
				skip[k] = true
				out = append(out, k)
			}
		}
	}
	return out, nil
}

// Element operations of one batch, applied in the order given.
const (
	addElems = true
	delElems = false
)

// change applies steps (addElems, delElems) to the elements keys, in order,
// in one batch.
func (l *ListenLock) change(op string, keys []listenKey, steps ...bool) error {
	if len(keys) == 0 {
		return nil
	}
	c, err := nftables.New(nftables.WithNetNSFd(l.nsfd))
	if err != nil {
		return &Error{Op: op, Table: l.table, Err: err}
	}
	_, v4, v6, p4, p6 := l.sets()
	byName := map[string]*nftables.Set{setListen4: v4, setListen6: v6, setPort4: p4, setPort6: p6}
	elems := map[string][]nftables.SetElement{}
	for _, k := range keys {
		elems[k.set] = append(elems[k.set], nftables.SetElement{Key: []byte(k.key), Timeout: l.cfg.Lease})
	}
	for _, add := range steps {
		for set, es := range elems {
			f := c.SetDeleteElements
			if add {
				f = c.SetAddElements
			}
			if err := f(byName[set], es); err != nil {
				return &Error{Op: op, Table: l.table, Err: err}
			}
		}
	}
	if err := c.Flush(); err != nil {
		return &Error{Op: op, Table: l.table, Err: err}
	}
	return nil
}

// Lock drops inbound SYNs to each listener endpoint from the moment the
// batch commits, for one lease. Endpoints already locked stay locked.
func (l *ListenLock) Lock(eps []netip.AddrPort) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return &Error{Op: "lock listeners", Table: l.table, Err: ErrClosed}
	}
	var fresh []netip.AddrPort
	for _, ep := range eps {
		if !slices.Contains(l.held, ep) && !slices.Contains(fresh, ep) {
			fresh = append(fresh, ep)
		}
	}
	if len(fresh) == 0 {
		return nil
	}
	// An element another endpoint locked already is added again: a no-op.
	keys, err := keysOf(fresh, nil)
	if err != nil {
		return &Error{Op: "lock listeners", Table: l.table, Err: err}
	}
	if err := l.change("lock listeners", keys, addElems); err != nil {
		return err
	}
	l.held = append(l.held, fresh...)
	return nil
}

// Unlock lets SYNs reach the listener endpoints again. Endpoints not
// locked are ignored.
func (l *ListenLock) Unlock(eps []netip.AddrPort) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	var gone []netip.AddrPort
	for _, ep := range eps {
		if i := slices.Index(l.held, ep); i >= 0 {
			gone = append(gone, ep)
			l.held = slices.Delete(l.held, i, i+1)
		}
	}
	// The elements the endpoints still locked need stay. An element may
	// have lapsed already: add then delete makes the batch valid either
	// way.
	keys, err := keysOf(gone, l.held)
	if err != nil {
		return &Error{Op: "unlock listeners", Table: l.table, Err: err}
	}
	return l.change("unlock listeners", keys, addElems, delElems)
}

// Held returns the locked endpoints.
func (l *ListenLock) Held() []netip.AddrPort {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.held)
}

// renewAll restarts the lease of every locked endpoint. After Close it
// fails with ErrClosed, which ends a renewer started while Close ran (as
// Lock.RenewAll ends Lock's).
func (l *ListenLock) renewAll() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return &Error{Op: "renew listeners", Table: l.table, Err: ErrClosed}
	}
	// Add (in case it lapsed), delete, add: one batch, a fresh lease.
	keys, err := keysOf(l.held, nil)
	if err != nil {
		return &Error{Op: "renew listeners", Table: l.table, Err: err}
	}
	return l.change("renew listeners", keys, addElems, delElems, addElems)
}

// StartRenewer renews every locked endpoint each third of the lease until
// StopRenewer or Close; errors go to onErr (if not nil) from the renewer's goroutine.
func (l *ListenLock) StartRenewer(onErr func(error)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.renewer != nil || l.closed {
		return
	}
	l.renewer = startRenewer(l.cfg.Lease/3, l.renewAll, onErr)
}

// Table returns the name of the lock's nftables table.
func (l *ListenLock) Table() string { return l.table }

// StopRenewer stops the renewer, if it runs: the locked endpoints keep
// their current lease and lapse when it ends, unless renewed again. The
// table stays. It is idempotent.
func (l *ListenLock) StopRenewer() {
	l.mu.Lock()
	r := l.renewer
	l.renewer = nil
	l.mu.Unlock()
	r.stopAndWait()
}

// Close stops the renewer and deletes the table, which unlocks every
// listener. It is idempotent; a table already gone is not an error.
func (l *ListenLock) Close() error {
	l.StopRenewer()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	c, err := nftables.New(nftables.WithNetNSFd(l.nsfd))
	if err == nil {
		c.DelTable(l.nftTable())
		err = c.Flush()
	}
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return &Error{Op: "close listen lock", Table: l.table, Err: err}
	}
	l.closed, l.held = true, nil
	l.release()
	return nil
}
