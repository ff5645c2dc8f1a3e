package target

import (
	"sync"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// restorer rebuilds the connections of one migration. The raw sockets that
// send segments crafted as if from the peer (repair.Injector) are opened
// the first time a connection's state needs them, in the namespace the
// restore runs in, with the lock's bypass mark, and kept until close.
type restorer struct {
	mu sync.Mutex // guards r.Injector while it is being opened
	r  repair.Restorer
}

// restore is repair's RestoreBlank (on b, made before the freeze, or on a
// new socket if b is nil or does not fit) with the injector the state
// needs; it runs in the target's network namespace and uses b up.
func (x *restorer) restore(b *repair.Blank, s *repair.Snapshot, mark uint32) (int, error) {
	if s.State.NeedsInjection() || s.Flags&repair.FlagHeld != 0 { // a held connection is kicked on resume
		if err := x.open(mark); err != nil {
			b.Close()
			return -1, err
		}
	}
	return x.r.RestoreBlank(b, s)
}

// open opens the injector if it is not open yet. The target calls it before
// it answers READY, so that the raw sockets are not made inside a freeze
// (most connections are held, and a held one is kicked on resume); it must
// run in the target's network namespace.
func (x *restorer) open(mark uint32) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.r.Injector != nil {
		return nil
	}
	inj, err := repair.NewInjector(mark)
	if err != nil {
		return err
	}
	x.r.Injector = inj
	return nil
}

// close closes the injector, if one was opened.
func (x *restorer) close() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.r.Injector == nil {
		return nil
	}
	err := x.r.Injector.Close()
	x.r.Injector = nil
	return err
}
