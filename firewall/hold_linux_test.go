package firewall

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestHold holds a connection on host a while b streams to it: a's segments
// reach b with a window of 0 (b's snd_wnd is 0 and it stops short of what
// it wrote), while a still receives. Lock moves the tuple from the hold set
// to the lock set in one batch; after Unlock the stream completes, every
// byte, and the ruleset nft lists has the window rewrite.
func TestHold(t *testing.T) {
	a, b := newLAN(t)
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			ca, cb := dialPair(t, a, b, f)
			cfg := Config{Instance: "hold-" + f.name, NetNS: a.Handle(), Hold: true}
			l := newTestLock(t, cfg)
			if !l.CanHold() {
				t.Fatal("CanHold is false on this kernel")
			}
			if rules := nftList(t, a, "table", "inet", l.Table()); !strings.Contains(rules, "tcp window set 0") {
				t.Fatalf("no window rewrite in the ruleset:\n%s", rules)
			}
			tu := tupleOf(ca)
			if err := l.Hold([]Tuple{tu}); err != nil {
				t.Fatal(err)
			}
			set, hset := setV4, holdV4
			if f.name == "ipv6" {
				set, hset = setV6, holdV6
			}
			if n := setLen(t, a, l.Table(), hset); n != 1 {
				t.Fatalf("hold set has %d elements, want 1", n)
			}

			const total = 8 << 20
			data := pattern(3, total)
			wrote := make(chan error, 1)
			go func() { _, err := cb.Write(data); wrote <- err }()
			waitFor(t, 5*time.Second, "b to see a zero window", func() bool {
				info, _ := sockInfo(t, cb)
				return info.Snd_wnd == 0 && info.Bytes_acked > 1
			})
			// Input is open: a takes in what b had in flight.
			waitFor(t, 5*time.Second, "a to receive", func() bool { return bytesReceived(t, ca) > 0 })
			info, _ := sockInfo(t, cb)
			if info.Bytes_acked >= total {
				t.Fatalf("b had everything acknowledged (%d bytes) despite the hold", info.Bytes_acked)
			}

			if err := l.Lock([]Tuple{tu}); err != nil {
				t.Fatal(err)
			}
			if h, s := setLen(t, a, l.Table(), hset), setLen(t, a, l.Table(), set); h != 0 || s != 1 {
				t.Fatalf("after Lock: hold set %d, lock set %d elements; want 0 and 1", h, s)
			}
			if err := l.Unlock([]Tuple{tu}); err != nil {
				t.Fatal(err)
			}
			// No hold and no lock: b's next persist probe learns the window.
			readExactly(t, "a", ca, data, 20*time.Second)
			if err := <-wrote; err != nil {
				t.Fatal(err)
			}
			checkHealthy(t, "a", ca)
			checkHealthy(t, "b", cb)

			// Hold then Unlock (a rollback before the lock) lifts the hold.
			if err := l.Hold([]Tuple{tu}); err != nil {
				t.Fatal(err)
			}
			if err := l.Unlock([]Tuple{tu}); err != nil {
				t.Fatal(err)
			}
			if n := setLen(t, a, l.Table(), hset); n != 0 {
				t.Fatalf("after Unlock the hold set has %d elements", n)
			}
		})
	}
}

// TestHoldNotConfigured: a lock made without Config.Hold has no hold sets
// and refuses Hold with ErrNoHold.
func TestHoldNotConfigured(t *testing.T) {
	a, _ := newLAN(t)
	l := newTestLock(t, Config{Instance: "nohold", NetNS: a.Handle()})
	if l.CanHold() {
		t.Error("CanHold without Config.Hold")
	}
	err := l.Hold([]Tuple{{Local: netip.MustParseAddrPort("198.18.0.1:1"), Remote: netip.MustParseAddrPort("198.18.0.2:2")}})
	if !errors.Is(err, ErrNoHold) {
		t.Fatalf("Hold: %v, want ErrNoHold", err)
	}
	if rules := nftList(t, a, "table", "inet", l.Table()); strings.Contains(rules, "window") {
		t.Fatalf("hold rule without Config.Hold:\n%s", rules)
	}
}
