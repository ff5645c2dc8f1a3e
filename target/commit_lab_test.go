package target_test

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// TestCommitLostKickDelivers commits a held connection whose kick (sent by
// the target once the socket is out of repair mode) cannot leave: a rule
// of the target host drops every segment from the peer's address at
// output, so the raw socket's sendto fails. The socket is live all the
// same: the target delivers it, out of repair mode, and does not report it
// failed (a source told "failed" discards its copy). Before, Resume's
// error made the target report it failed and keep the live socket open,
// delivered to nobody.
func TestCommitLostKickDelivers(t *testing.T) {
	h := newHarness(t, hostilePolicy)
	nft := h.dst.Command("nft", "-f", "-")
	nft.Stdin = strings.NewReader("table ip kicktest {\n chain out {\n  type filter hook output priority 0; policy accept;\n  ip saddr " +
		fake.String() + " drop\n }\n}\n")
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}

	l := h.dial(t, h.srcCert)
	defer l.Close()
	id := transport.NewMigrationID()
	s := fakeSnapshot(netip.AddrPortFrom(hSvc.Addr(), svcPort), 5601)
	if !s.MarkHeld() {
		t.Fatal("MarkHeld refused the snapshot")
	}
	if vs := h.prepareGo(t, l, id, []*repair.Snapshot{s}); vs[0].Code != transport.VerdictOK {
		t.Fatalf("the held connection was not restored: %s %q", vs[0].Code, vs[0].Reason)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	recv := func() transport.Message {
		t.Helper()
		m, err := l.Control().Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	if err := l.Control().Send(ctx, &transport.Switch{Migration: id, Addrs: []netip.Prefix{hSvc}}); err != nil {
		t.Fatal(err)
	}
	if m := recv(); m.Type() != (&transport.Switched{}).Type() {
		t.Fatalf("the target answered Switch with %s", m.Type())
	}
	if err := l.Control().Send(ctx, &transport.Commit{Migration: id}); err != nil {
		t.Fatal(err)
	}
	c, ok := recv().(*transport.Committed)
	if !ok {
		t.Fatal("the target did not answer Commit with Committed")
	}
	if len(c.Failed) != 0 {
		t.Fatalf("the target reported %+v failed", c.Failed)
	}
	select {
	case d := <-h.delivered:
		defer d.File.Close()
		v, err := unix.GetsockoptInt(int(d.File.Fd()), unix.IPPROTO_TCP, unix.TCP_REPAIR)
		if err != nil || v != 0 {
			t.Fatalf("the delivered socket: TCP_REPAIR = %d (%v), want 0", v, err)
		}
		if d.Remote.Port() != 5601 {
			t.Fatalf("delivered %v, want the held connection", d.Remote)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nothing delivered")
	}
}
