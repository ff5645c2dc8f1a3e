package repair

import (
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// TestListenerRoundTrip describes listeners of both families with their
// options set, recreates them on another host before the address is there,
// and checks that the copy reads back the same. The address need not be
// present (the listener accepting is shown end to end in e2e).
func TestListenerRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name   string
		v6     bool
		family uint16
		local  string
		v6only bool
	}{
		{"v4", false, unix.AF_INET, "198.18.0.10:8080", false},
		{"v6", true, unix.AF_INET6, "[fd00::10]:8080", true},
		{"v6-wildcard-dualstack", true, unix.AF_INET6, "[::]:8081", false},
		{"v4-wildcard", false, unix.AF_INET, "0.0.0.0:8082", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHosts(t, tc.v6)
			local := netip.MustParseAddrPort(tc.local)
			var want Listener
			err := h.src.Do(func() error {
				fd, err := unix.Socket(int(tc.family), unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					return err
				}
				t.Cleanup(func() { unix.Close(fd) })
				set := func(level, name int, v int) {
					if err := unix.SetsockoptInt(fd, level, name, v); err != nil {
						t.Fatalf("setsockopt %d/%d: %v", level, name, err)
					}
				}
				if tc.family == unix.AF_INET6 {
					set(unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, boolInt(tc.v6only))
				}
				set(unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
				set(unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
				set(unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
				set(unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 77)
				set(unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 11)
				set(unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 5)
				set(unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
				set(unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 3)
				set(unix.SOL_SOCKET, unix.SO_RCVBUF, 96<<10)
				set(unix.SOL_SOCKET, unix.SO_MARK, 42)
				if err := bindRaw(fd, tc.family, local); err != nil {
					return err
				}
				set(unix.IPPROTO_TCP, unix.TCP_FASTOPEN, 16)
				if err := unix.Listen(fd, 37); err != nil {
					return err
				}
				return DescribeListener(fd, &want)
			})
			if err != nil {
				t.Fatal(err)
			}
			if want.Backlog != 37 || !want.ReuseAddr || !want.ReusePort || !want.KeepAlive || want.KeepIdle != 77 ||
				!want.NoDelay || want.DeferAccept == 0 || want.FastOpen != 16 || want.Mark != 42 || want.BufLock != 2 ||
				want.V6Only != tc.v6only || want.Local != local {
				t.Fatalf("described %+v", want)
			}
			var got Listener
			var lfd int
			err = h.dst.Do(func() error {
				var err error
				// The service address is not on the target yet.
				if lfd, err = Listen(&want); err != nil {
					return err
				}
				return DescribeListener(lfd, &got)
			})
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(lfd)
			if got != want {
				t.Fatalf("recreated listener differs:\n got %+v\nwant %+v", got, want)
			}
		})
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestListenerValidate refuses descriptions Listen must not act on.
func TestListenerValidate(t *testing.T) {
	ok := Listener{Family: unix.AF_INET, Local: netip.MustParseAddrPort("198.18.0.1:80"), Backlog: 10}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*Listener){
		"family":   func(l *Listener) { l.Family = 99 },
		"port0":    func(l *Listener) { l.Local = netip.MustParseAddrPort("198.18.0.1:0") },
		"v6addr":   func(l *Listener) { l.Local = netip.MustParseAddrPort("[fd00::1]:80") },
		"backlog0": func(l *Listener) { l.Backlog = 0 },
		"v6only4":  func(l *Listener) { l.V6Only = true },
		"dev":      func(l *Listener) { l.BindToDevice = "a/b" },
		"buflock":  func(l *Listener) { l.BufLock = 9 },
	} {
		l := ok
		mut(&l)
		if err := l.Validate(); err == nil {
			t.Errorf("%s: %+v accepted", name, l)
		}
	}
}
