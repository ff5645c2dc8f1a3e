package firewall

import (
	"errors"

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
