// Package shares splits a run of per-connection work over the CPUs the Go
// runtime uses: the restores and resumes of the target, the announcements
// of the source's hold. The work is system calls on independent sockets,
// so contiguous shares, one goroutine each, are all it needs.
package shares

import (
	"errors"
	"runtime"
	"sync"
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
