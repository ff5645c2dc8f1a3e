package lab

import (
	"testing"
	"time"
)

// WaitTimeout is how long WaitFor polls before it fails the test.
const WaitTimeout = 10 * time.Second

// WaitFor polls cond, at first every millisecond and then less often (at
// most every 50ms), until it returns true; after WaitTimeout it fails the
// test with what and the last description cond gave.
func WaitFor(tb testing.TB, what string, cond func() (bool, string)) {
	tb.Helper()
	WaitForWithin(tb, WaitTimeout, what, cond)
}

// WaitForWithin is WaitFor with a timeout of its own.
func WaitForWithin(tb testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	delay := time.Millisecond
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s; last: %s", what, last)
		}
		time.Sleep(delay)
		delay = min(2*delay, 50*time.Millisecond)
	}
}
