package target

import (
	"slices"
	"sync"
	"sync/atomic"

	"github.com/tcpmigrate/tcpmigrate/internal/nsdo"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// blanks are the sockets the target makes for a migration's connections
// after READY, while the source holds and drains them and before it locks
// (repair.Blank): the restore inside the freeze then does only the steps
// that need the frozen state. They are made in the order of PREPARE's
// tuples, on one goroutine, until the first snapshot arrives; a connection
// whose socket was not made by then is restored on a new socket, as are
// those a Blank does not fit (repair.Restorer.RestoreBlank).
type blanks struct {
	slots []atomic.Pointer[repair.Blank]
	stop  atomic.Bool
	wg    sync.WaitGroup
	made  atomic.Int64 // how many were made, for the log
	// unpreset counts the Blanks closed because their options could not
	// be set (repair.Restorer.Preset): their connections are restored on
	// new sockets.
	unpreset atomic.Int64
}

// taken marks a slot whose Blank was taken, or that no Blank may fill.
var taken = new(repair.Blank)

// startBlanks makes a Blank for each tuple of want whose ok[i] is set (the
// tuples prelock locked), in the network namespace ns, and gives it the
// options of presets that the tuple names (r.Preset, which reads only r's
// Defaults: the restore then writes only those that differ from its
// snapshot's). It returns at once; failures only mean fewer Blanks.
func startBlanks(ns int, r *repair.Restorer, want []transport.Tuple, presets []repair.Options, ok []bool) *blanks {
	b := &blanks{slots: make([]atomic.Pointer[repair.Blank], len(want))}
	// Copies: the restores change the migration's prelocked flags (a
	// refused tuple is let go) while this goroutine may still read them.
	want, ok = slices.Clone(want), slices.Clone(ok)
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		nsdo.Do(ns, func() error {
			for i, t := range want {
				if b.stop.Load() {
					return nil
				}
				if i >= len(ok) || !ok[i] || b.slots[i].Load() != nil {
					continue
				}
				// IPv4-mapped from a version of the source that sends
				// them so: an AF_INET6 Blank for a dual-stack socket's
				// IPv4 client (an older source's unmapped tuple gives an
				// AF_INET one, which does not fit it: a new socket then).
				bl, err := repair.NewBlank(t.Local)
				if err != nil {
					continue
				}
				// PREPARE's validation bounds t.Preset by len(presets).
				if p := t.Preset; p > 0 && int(p) <= len(presets) {
					if r.Preset(bl, &presets[p-1]) != nil {
						b.unpreset.Add(1)
						continue // closed: a new socket at the restore
					}
				}
				if !b.slots[i].CompareAndSwap(nil, bl) {
					bl.Close()
					continue
				}
				b.made.Add(1)
			}
			return nil
		})
	}()
	return b
}

// halt stops the making of Blanks; those made stay for take. It may be
// called on a nil *blanks, and more than once.
func (b *blanks) halt() {
	if b != nil {
		b.stop.Store(true)
	}
}

// making reports whether Blanks are still being made (none was halted or
// released yet). It may be called on a nil *blanks.
func (b *blanks) making() bool {
	return b != nil && !b.stop.Load()
}

// take returns connection i's Blank, or nil if none was made (yet: none
// will be for i after this).
func (b *blanks) take(i uint32) *repair.Blank {
	if b == nil || int(i) >= len(b.slots) {
		return nil
	}
	if bl := b.slots[i].Swap(taken); bl != taken {
		return bl
	}
	return nil
}

// release stops the making of Blanks, waits for the goroutine and closes
// every Blank not taken (silently: they are in repair mode and never
// connected). It may be called on a nil *blanks, and more than once.
func (b *blanks) release() {
	if b == nil {
		return
	}
	b.halt()
	b.wg.Wait()
	for i := range b.slots {
		if bl := b.take(uint32(i)); bl != nil {
			bl.Close()
		}
	}
}
