package shares

import (
	"errors"
	"runtime"
	"sync"
	"testing"
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
