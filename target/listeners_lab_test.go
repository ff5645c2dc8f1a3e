package target_test

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// TestListenerConflictLeavesPortOpen sends LISTENERS for an endpoint a
// local service of the target host already listens on: the target answers
// Conflict and, while the migration is still open, the local service keeps
// accepting connections from the peer host (the endpoint, locked before
// the listener was recreated, is unlocked as soon as the recreation
// failed; before, it stayed locked until the migration ended).
func TestListenerConflictLeavesPortOpen(t *testing.T) {
	pol := hostilePolicy
	pol.Allow = []netip.Prefix{netip.PrefixFrom(hDst.Addr(), 32)}
	pol.AllowPorts = nil
	h := newHarness(t, pol)
	ep := netip.AddrPortFrom(hDst.Addr(), 9090)
	var local net.Listener
	if err := h.dst.Do(func() (err error) {
		local, err = net.Listen("tcp", ep.String())
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

	l := h.dial(t, h.srcCert)
	defer l.Close()
	id := transport.NewMigrationID()
	h.prepareGo(t, l, id, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	spec := transport.ListenerSpec{Listener: repair.Listener{Family: unix.AF_INET, Local: ep, Backlog: 16}}
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
	if v := ready.Verdicts[0]; v.Code != transport.VerdictConflict {
		t.Fatalf("verdict %s (%q), want %s", v.Code, v.Reason, transport.VerdictConflict)
	}
	// The migration is still open (no Abort, no Commit): the local
	// service must answer the peer's SYN now, not after the SYN is
	// retransmitted once the migration ends.
	err = h.peer.Do(func() error {
		c, err := net.DialTimeout("tcp", ep.String(), 700*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err
	})
	if err != nil {
		t.Fatalf("the peer cannot reach the local service on %s during the migration: %v", ep, err)
	}
	if err := l.Control().Send(ctx, &transport.Abort{Migration: id, Code: transport.AbortCanceled}); err != nil {
		t.Fatal(err)
	}
	h.assertClean(t, &id)
}
