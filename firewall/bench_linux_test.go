package firewall

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// BenchmarkLockUnlock measures one Lock and one Unlock of n tuples (n set
// elements, one batch each) in a lab namespace. Besides ns/op for the pair
// it reports each direction in ms: ms/lock and ms/unlock. Run with
//
//	go test -run '^$' -bench . ./firewall/
func BenchmarkLockUnlock(b *testing.B) {
	ns := lab.NewTestNS(b, "bench")
	l := newTestLock(b, Config{Instance: "bench", NetNS: ns.Handle()})
	for _, n := range []int{1, 1000, 10000} {
		ts := tuples(n, netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.1.1"))
		b.Run(fmt.Sprintf("tuples=%d", n), func(b *testing.B) {
			var lock, unlock time.Duration
			for b.Loop() {
				t0 := time.Now()
				if err := l.Lock(ts); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				if err := l.Unlock(ts); err != nil {
					b.Fatal(err)
				}
				lock += t1.Sub(t0)
				unlock += time.Since(t1)
			}
			b.ReportMetric(float64(lock.Microseconds())/1e3/float64(b.N), "ms/lock")
			b.ReportMetric(float64(unlock.Microseconds())/1e3/float64(b.N), "ms/unlock")
		})
	}
}

// BenchmarkRenew measures renewing the lease of n locked tuples.
func BenchmarkRenew(b *testing.B) {
	ns := lab.NewTestNS(b, "bench")
	l := newTestLock(b, Config{Instance: "bench", NetNS: ns.Handle()})
	for _, n := range []int{1, 1000, 10000} {
		ts := tuples(n, netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.1.1"))
		b.Run(fmt.Sprintf("tuples=%d", n), func(b *testing.B) {
			if err := l.Lock(ts); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if err := l.Renew(ts); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if err := l.Unlock(ts); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/1e3/float64(b.N), "ms/renew")
		})
	}
}

// BenchmarkLockFresh measures the first Lock of n tuples on a new instance,
// the one the first wave of a migration pays: the sets are empty and small,
// and the Lock has no buffers yet. New and Close are not timed.
func BenchmarkLockFresh(b *testing.B) {
	ns := lab.NewTestNS(b, "bench")
	for _, n := range []int{1000, 10000} {
		ts := tuples(n, netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.1.1"))
		b.Run(fmt.Sprintf("tuples=%d", n), func(b *testing.B) {
			var lock time.Duration
			for b.Loop() {
				b.StopTimer()
				l, err := New(Config{Instance: "fresh", NetNS: ns.Handle()})
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				t0 := time.Now()
				if err := l.Lock(ts); err != nil {
					b.Fatal(err)
				}
				lock += time.Since(t0)
				b.StopTimer()
				if err := l.Close(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(lock.Microseconds())/1e3/float64(b.N), "ms/lock")
		})
	}
}
