package target_test

import (
	"context"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// TestListenerLocalServiceKeepsPort sends LISTENERS for an endpoint a local
// service of the target host already listens on, plainly or in a
// SO_REUSEPORT group (root's, like the agent, so that the kernel would let
// a new listener join it): the target answers Conflict (for the group,
// before creating anything: joining it would take a share of the local
// service's connections) and, while the migration is still open, the
// local service keeps accepting connections from the peer host (the
// endpoint, locked before the listener was recreated, is unlocked as soon
// as that failed; before, it stayed locked until the migration ended). A
// SO_REUSEPORT listener on a free port is still recreated.
func TestListenerLocalServiceKeepsPort(t *testing.T) {
	pol := hostilePolicy
	pol.Allow = []netip.Prefix{netip.PrefixFrom(hDst.Addr(), 32)}
	pol.AllowPorts = nil
	h := newHarness(t, pol)
	for i, tc := range []struct {
		name      string
		reusePort bool // both the local service and the migrated listener
		local     bool // a local service listens on the endpoint
		want      transport.VerdictCode
	}{
		{"plain", false, true, transport.VerdictConflict},
		{"reuseport-group", true, true, transport.VerdictConflict},
		{"reuseport-free-port", true, false, transport.VerdictOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ep := netip.AddrPortFrom(hDst.Addr(), uint16(9090+i))
			if tc.local {
				lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
					var serr error
					err := c.Control(func(fd uintptr) {
						if tc.reusePort {
							serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
						}
					})
					if err != nil {
						return err
					}
					return serr
				}}
				var local net.Listener
				if err := h.dst.Do(func() (err error) {
					local, err = lc.Listen(context.Background(), "tcp4", ep.String())
					return err
				}); err != nil {
					t.Fatal(err)
				}
				defer local.Close()
				go func() {
					for {
						c, err := local.Accept()
						if err != nil {
							return
						}
						c.Close()
					}
				}()
			}

			l := h.dial(t, h.srcCert)
			defer l.Close()
			id := transport.NewMigrationID()
			h.prepareGo(t, l, id, nil)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			spec := transport.ListenerSpec{Listener: repair.Listener{Family: unix.AF_INET, Local: ep, Backlog: 16, ReusePort: tc.reusePort}}
			if err := l.Control().Send(ctx, &transport.Listeners{Migration: id, Listeners: []transport.ListenerSpec{spec}}); err != nil {
				t.Fatal(err)
			}
			m, err := l.Control().Recv(ctx)
			if err != nil {
				t.Fatal(err)
			}
			ready, ok := m.(*transport.ListenersReady)
			if !ok || len(ready.Verdicts) != 1 {
				t.Fatalf("the target answered LISTENERS with %s %+v", m.Type(), m)
			}
			if v := ready.Verdicts[0]; v.Code != tc.want {
				t.Fatalf("verdict %s (%q), want %s", v.Code, v.Reason, tc.want)
			}
			if tc.local {
				// The migration is still open (no Abort, no Commit): the
				// local service must answer the peer's SYNs now, every
				// one of them, not after a retransmission once the
				// migration ends.
				err = h.peer.Do(func() error {
					for range 8 {
						c, err := net.DialTimeout("tcp", ep.String(), 700*time.Millisecond)
						if err != nil {
							return err
						}
						c.Close()
					}
					return nil
				})
				if err != nil {
					t.Fatalf("the peer cannot reach the local service on %s during the migration: %v", ep, err)
				}
			}
			if err := l.Control().Send(ctx, &transport.Abort{Migration: id, Code: transport.AbortCanceled}); err != nil {
				t.Fatal(err)
			}
			// The target closes the link once it has aborted.
			for {
				if _, err := l.Control().Recv(ctx); err != nil {
					break
				}
			}
			h.assertClean(t, &id)
		})
	}
}
