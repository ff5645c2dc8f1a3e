package firewall

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// TestListenLockDropsSYNs locks a listener (by address, and bound to the
// unspecified address) and checks from the dialling host that new
// connections time out (their SYNs vanish: no refusal, no reset), that an
// established connection to the same port still carries data both ways,
// that a dial started while locked completes through its SYN
// retransmission once the lock is gone, and that Close removes the table.
func TestListenLockDropsSYNs(t *testing.T) {
	a, b := newLAN(t)
	for _, f := range families {
		for _, wildcard := range []bool{false, true} {
			name := f.name
			if wildcard {
				name += "-wildcard"
			}
			t.Run(name, func(t *testing.T) {
				bind := netip.AddrPortFrom(f.b.Addr(), 0)
				if wildcard {
					bind = netip.MustParseAddrPort("[::]:0") // dual-stack: the lock covers both families
				}
				var ln net.Listener
				if err := b.Do(func() error {
					var err error
					ln, err = net.Listen("tcp", bind.String())
					return err
				}); err != nil {
					t.Fatal(err)
				}
				defer ln.Close()
				go func() {
					for {
						c, err := ln.Accept()
						if err != nil {
							return
						}
						go func() { io.Copy(c, c); c.Close() }()
					}
				}()
				lap := netip.MustParseAddrPort(ln.Addr().String())
				target := netip.AddrPortFrom(f.b.Addr(), lap.Port())
				dial := func(timeout time.Duration) (net.Conn, error) {
					var c net.Conn
					err := a.Do(func() error {
						var err error
						c, err = net.DialTimeout("tcp", target.String(), timeout)
						return err
					})
					return c, err
				}
				est, err := dial(time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer est.Close()

				var l *ListenLock
				if err := b.Do(func() error {
					var err error
					l, err = NewListenLock(Config{Instance: "lsn-test-" + name, Lease: 2 * time.Second})
					return err
				}); err != nil {
					t.Fatal(err)
				}
				defer l.Close()
				l.StartRenewer(func(err error) { t.Errorf("renew: %v", err) })
				ep := lap
				if !wildcard {
					ep = target
				}
				if err := l.Lock([]netip.AddrPort{ep}); err != nil {
					t.Fatal(err)
				}
				if _, err := dial(400 * time.Millisecond); !isTimeout(err) {
					t.Fatalf("dial while locked: %v, want a timeout (SYN dropped)", err)
				}
				echo(t, est, "still flowing")

				// A dial started under the lock gets through on its SYN
				// retransmission (1 s) once the lock is gone; the renewer
				// keeps the lock through a whole lease meanwhile.
				res := make(chan error, 1)
				go func() {
					c, err := dial(5 * time.Second)
					if err == nil {
						echo(t, c, "after unlock")
						c.Close()
					}
					res <- err
				}()
				time.Sleep(2500 * time.Millisecond) // longer than the lease: renewal must hold it
				select {
				case err := <-res:
					t.Fatalf("dial completed while locked: %v", err)
				default:
				}
				if err := l.Unlock([]netip.AddrPort{ep}); err != nil {
					t.Fatal(err)
				}
				if err := <-res; err != nil {
					t.Fatalf("dial after unlock: %v", err)
				}
				if err := l.Close(); err != nil {
					t.Fatal(err)
				}
				if err := l.Close(); err != nil {
					t.Fatalf("second close: %v", err)
				}
			})
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded)
}

func echo(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Errorf("write: %v", err)
		return
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Errorf("echo %q: got %q, %v", msg, buf, err)
	}
}

// TestListenLockOverlap locks a wildcard IPv6 listener and a wildcard IPv4
// one on the same port (the pair a server with an IPV6_V6ONLY socket
// beside an IPv4 one has), whose elements overlap: the IPv6 one locks the
// port in both families. Renewing both must work, and unlocking one must
// keep what the other still needs.
func TestListenLockOverlap(t *testing.T) {
	ns := lab.NewTestNS(t, "lsn-overlap")
	var l *ListenLock
	if err := ns.Do(func() error {
		var err error
		l, err = NewListenLock(Config{Instance: "lsn-overlap", Lease: 2 * time.Second})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	v6, v4 := netip.MustParseAddrPort("[::]:8080"), netip.MustParseAddrPort("0.0.0.0:8080")
	if err := l.Lock([]netip.AddrPort{v6, v4}); err != nil {
		t.Fatal(err)
	}
	if err := l.renewAll(); err != nil {
		t.Fatalf("renew of overlapping endpoints: %v", err)
	}
	if err := l.Unlock([]netip.AddrPort{v6}); err != nil {
		t.Fatal(err)
	}
	if p4, p6 := setLen(t, ns, l.Table(), setPort4), setLen(t, ns, l.Table(), setPort6); p4 != 1 || p6 != 0 {
		t.Errorf("after unlocking %v: %d IPv4 and %d IPv6 port elements, want 1 and 0 (%v still locked)", v6, p4, p6, v4)
	}
	if err := l.Unlock([]netip.AddrPort{v4}); err != nil {
		t.Fatal(err)
	}
	if p4 := setLen(t, ns, l.Table(), setPort4); p4 != 0 {
		t.Errorf("after unlocking both: %d IPv4 port elements", p4)
	}
}
