package shares

import (
	"errors"
	"iter"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestRun checks that the shares cover [0, n) exactly once, that no share
// is smaller than least unless n is, and that errors are joined.
func TestRun(t *testing.T) {
	for _, tc := range []struct{ n, least int }{{0, 16}, {1, 16}, {15, 16}, {17, 16}, {33, 16}, {1000, 16}, {7, 1}} {
		var mu sync.Mutex
		seen := make([]int, tc.n)
		shares := 0
		err := Run(tc.n, tc.least, func(lo, hi int) error {
			mu.Lock()
			defer mu.Unlock()
			shares++
			if hi-lo < tc.least && hi-lo != tc.n {
				t.Errorf("n=%d: share [%d, %d) smaller than %d", tc.n, lo, hi, tc.least)
			}
			for i := lo; i < hi; i++ {
				seen[i]++
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for i, c := range seen {
			if c != 1 {
				t.Fatalf("n=%d: item %d done %d times", tc.n, i, c)
			}
		}
		if tc.n > 0 && shares > runtime.GOMAXPROCS(0) {
			t.Errorf("n=%d: %d shares for %d CPUs", tc.n, shares, runtime.GOMAXPROCS(0))
		}
	}
	boom := errors.New("boom")
	if err := Run(100, 1, func(lo, hi int) error { return boom }); !errors.Is(err, boom) {
		t.Errorf("Run returned %v, want the shares' error", err)
	}
}

// TestChunks checks that the chunks cover [0, n) exactly once, that none
// is larger than size, that no more goroutines run than Run would start,
// that a stalled goroutine leaves the rest of the work to the others, and
// that errors are joined.
func TestChunks(t *testing.T) {
	for _, tc := range []struct{ n, least, size int }{{0, 16, 8}, {1, 16, 8}, {15, 16, 8}, {33, 16, 8}, {1000, 16, 32}, {1000, 16, 0}, {7, 1, 3}} {
		var mu sync.Mutex
		seen := make([]int, tc.n)
		goroutines := 0
		err := Chunks(tc.n, tc.least, tc.size, func(chunks iter.Seq2[int, int]) error {
			mu.Lock()
			goroutines++
			mu.Unlock()
			for lo, hi := range chunks {
				mu.Lock()
				if hi-lo > max(tc.size, 1) || hi <= lo {
					t.Errorf("n=%d: chunk [%d, %d) empty or larger than %d", tc.n, lo, hi, tc.size)
				}
				for i := lo; i < hi; i++ {
					seen[i]++
				}
				mu.Unlock()
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for i, c := range seen {
			if c != 1 {
				t.Fatalf("n=%d size=%d: item %d done %d times", tc.n, tc.size, i, c)
			}
		}
		if want := max(1, min(runtime.GOMAXPROCS(0), tc.n/max(tc.least, 1))); tc.n > 0 && goroutines != want {
			t.Errorf("n=%d least=%d: %d goroutines, want %d", tc.n, tc.least, goroutines, want)
		}
	}

	// One goroutine stalls on its first chunk until the others have done
	// everything else: with fixed shares it would still own half the work.
	if runtime.GOMAXPROCS(0) >= 2 {
		const n = 400
		var done atomic.Int64
		var once sync.Once
		stalled := false
		err := Chunks(n, 1, 4, func(chunks iter.Seq2[int, int]) error {
			for lo, hi := range chunks {
				first := false
				once.Do(func() { first = true })
				if first {
					// Wait until every other chunk is done (with fixed
					// shares that would never happen: give up after 5 s).
					deadline := time.Now().Add(5 * time.Second)
					for done.Load() < n-int64(hi-lo) {
						if time.Now().After(deadline) {
							return errors.New("the other goroutines stopped while one was stalled")
						}
						runtime.Gosched()
					}
					stalled = true
				}
				done.Add(int64(hi - lo))
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if !stalled || done.Load() != n {
			t.Fatalf("stalled %v, %d items done, want %d", stalled, done.Load(), n)
		}
	}

	// Small runs: every goroutine gets work (chunks shrink to n/4k).
	if k := runtime.GOMAXPROCS(0); k >= 2 {
		var mu sync.Mutex
		per := map[int]int{}
		id := 0
		Chunks(40, 16, 32, func(chunks iter.Seq2[int, int]) error {
			mu.Lock()
			me := id
			id++
			mu.Unlock()
			for lo, hi := range chunks {
				mu.Lock()
				per[me] += hi - lo
				mu.Unlock()
				time.Sleep(time.Millisecond) // a chunk takes a while: the other goroutine must get some
			}
			return nil
		})
		if len(per) != 2 || per[0] == 0 || per[1] == 0 {
			t.Errorf("40 items over 2 goroutines: %v, want work on both", per)
		}
	}

	// A goroutine that stops ranging leaves its chunk undone, not the rest
	// (with one goroutine, everything after it).
	var left atomic.Int64
	var stopped atomic.Bool
	Chunks(64, 1, 8, func(chunks iter.Seq2[int, int]) error {
		for lo, hi := range chunks {
			if stopped.CompareAndSwap(false, true) {
				break
			}
			left.Add(int64(hi - lo))
		}
		return nil
	})
	if n := left.Load(); runtime.GOMAXPROCS(0) >= 2 && (n >= 64 || n < 64-8) {
		t.Errorf("%d of 64 items done after one goroutine stopped on a chunk of at most 8", n)
	}

	boom := errors.New("boom")
	err := Chunks(100, 1, 10, func(chunks iter.Seq2[int, int]) error {
		for range chunks {
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Errorf("Chunks returned %v, want the goroutines' error", err)
	}
}
