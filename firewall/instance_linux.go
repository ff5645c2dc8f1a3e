package firewall

import (
	"errors"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// instance is what a Lock and a ListenLock share: the validated Config, the
// table's name, our duplicate of the namespace descriptor and the owner
// socket, bound while the instance lives.
type instance struct {
	cfg   Config
	table string
	nsfd  int // our duplicate of the namespace descriptor
	owner int // the owner socket, bound while the instance lives
}

// claim validates cfg, duplicates its namespace descriptor, binds the owner
// socket of its table in that namespace, then runs create, which keeps the
// instance and builds the table. If anything fails, what was taken is
// released and the error, wrapped in an *Error of op, is ErrExists if the
// instance is held or its table exists.
func claim(op string, cfg Config, create func(in *instance) error) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return &Error{Op: op, Err: err}
	}
	in := &instance{cfg: cfg, table: TableName(cfg.Instance)}
	fail := func(err error) error { return &Error{Op: op, Table: in.table, Err: err} }
	in.nsfd, err = dupNetNS(cfg.NetNS)
	if err != nil {
		return fail(err)
	}
	err = inNetNS(in.nsfd, func() error {
		var err error
		in.owner, err = claimOwner(in.table)
		return err
	})
	if err != nil {
		unix.Close(in.nsfd)
		return fail(err)
	}
	if err := create(in); err != nil {
		in.release()
		if errors.Is(err, unix.EEXIST) {
			err = ErrExists
		}
		return fail(err)
	}
	return nil
}

// release closes the owner socket, which frees the instance's name, and the
// namespace descriptor.
func (in *instance) release() {
	unix.Close(in.owner)
	unix.Close(in.nsfd)
}

// nftTable is the instance's table, as google/nftables names it.
func (in *instance) nftTable() *nftables.Table {
	return &nftables.Table{Name: in.table, Family: nftables.TableFamilyINet}
}

// chainSpec is one base chain of an instance's table and its rules.
type chainSpec struct {
	name  string
	hook  *nftables.ChainHook
	rules [][]expr.Any // after the bypass rule
}

// createTable builds the instance's table tbl in one batch, through
// google/nftables: the table, created with NLM_F_EXCL so that an existing
// one is never adopted or changed, its sets, and its chains, each a filter
// chain at Priority with policy accept whose first rule passes the bypass
// mark. The sets' IDs only link the rules to them within this batch: fixed
// by the caller, they keep google/nftables from touching its
// unsynchronised global counter.
func (in *instance) createTable(tbl *nftables.Table, sets []*nftables.Set, chains []chainSpec) error {
	c, err := nftables.New(nftables.WithNetNSFd(in.nsfd))
	if err != nil {
		return err
	}
	c.CreateTable(tbl)
	for _, s := range sets {
		if err := c.AddSet(s, nil); err != nil {
			return err
		}
	}
	accept := nftables.ChainPolicyAccept
	for _, ch := range chains {
		chain := c.AddChain(&nftables.Chain{Name: ch.name, Table: tbl, Type: nftables.ChainTypeFilter,
			Hooknum: ch.hook, Priority: nftables.ChainPriorityRef(Priority), Policy: &accept})
		c.AddRule(&nftables.Rule{Table: tbl, Chain: chain, Exprs: bypassRule(in.cfg.BypassMark)})
		for _, exprs := range ch.rules {
			c.AddRule(&nftables.Rule{Table: tbl, Chain: chain, Exprs: exprs})
		}
	}
	return c.Flush()
}
