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

// restore is repair's Restore with the injector the state needs; it runs
// in the target's network namespace.
func (x *restorer) restore(s *repair.Snapshot, mark uint32) (int, error) {
	if s.State.NeedsInjection() || s.Flags&repair.FlagHeld != 0 { // a held connection is kicked on resume
		x.mu.Lock()
		if x.r.Injector == nil {
			inj, err := repair.NewInjector(mark)
			if err != nil {
				x.mu.Unlock()
				return -1, err
			}
			x.r.Injector = inj
		}
		x.mu.Unlock()
	}
	return x.r.Restore(s)
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
