// Package shares splits a run of per-connection work over the CPUs the Go
// runtime uses: the restores and resumes of the target, the inspection and
// the announcements of the source's hold. The work is system calls on independent sockets:
// contiguous shares, one goroutine each (Run), or chunks handed out to
// whichever goroutine is free (Chunks) when the shares would not take
// equally long.
package shares

import (
	"errors"
	"iter"
	"runtime"
	"sync"
	"sync/atomic"
)

// Run splits [0, n) into contiguous shares, one per CPU the runtime uses
// but never smaller than least items (below that a goroutine costs more
// than a second core gives), runs fn on each share concurrently, the first
// on the calling goroutine, and returns the errors of all shares joined.
func Run(n, least int, fn func(lo, hi int) error) error {
	if n <= 0 {
		return nil
	}
	k := min(runtime.GOMAXPROCS(0), n/max(least, 1))
	if k <= 1 {
		return fn(0, n)
	}
	errs := make([]error, k)
	var wg sync.WaitGroup
	for i := 1; i < k; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(i*n/k, (i+1)*n/k)
		}()
	}
	errs[0] = fn(0, n/k)
	wg.Wait()
	return errors.Join(errs...)
}

// Chunks runs fn on as many goroutines as Run would start for n items and
// least, the first on the calling goroutine, and hands [0, n) out to them
// in chunks of at most size items: each goroutine's fn ranges over
// chunks, and each chunk goes to whichever goroutine asks first, instead
// of contiguous shares fixed in advance. A goroutine that loses its core
// for a while (to the garbage collector, another process, a softirq) then
// does less of the work instead of finishing last. The chunks are made
// smaller when n is small, so that each goroutine gets at least four. fn
// does its own set-up around the loop (a thread in another namespace),
// once per goroutine; one that returns early, or stops ranging, leaves
// the rest of the chunk it held undone (the others go on with theirs).
// Chunks returns the errors of all goroutines joined.
func Chunks(n, least, size int, fn func(chunks iter.Seq2[int, int]) error) error {
	if n <= 0 {
		return nil
	}
	k := max(1, min(runtime.GOMAXPROCS(0), n/max(least, 1)))
	size = max(1, min(size, n/(4*k)))
	var next atomic.Int64
	chunks := func(yield func(lo, hi int) bool) {
		for {
			lo := int(next.Add(int64(size))) - size
			if lo >= n || !yield(lo, min(lo+size, n)) {
				return
			}
		}
	}
	return Run(k, 1, func(int, int) error {
		return fn(chunks)
	})
}
