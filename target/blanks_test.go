package target

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// TestBlanksFamily makes Blanks in a namespace of its own from PREPARE
// tuples and checks which snapshots they fit: an IPv4-mapped tuple (a
// dual-stack server's IPv4 client) gives a Blank that fits the AF_INET6
// snapshot of that connection, a plain IPv4 tuple one that fits an
// AF_INET snapshot and not the mapped one; a tuple prelock left out gets
// none, and release closes what was not taken. The tuple that names one
// of PREPARE's option presets gets its Blank preset with it.
func TestBlanksFamily(t *testing.T) {
	ns := lab.NewTestNS(t, "blanks")
	v4 := netip.MustParseAddrPort("198.18.0.10:8080")
	mapped := netip.AddrPortFrom(netip.AddrFrom16(v4.Addr().As16()), v4.Port())
	peer := netip.MustParseAddrPort("198.18.0.1:40000")
	peerMapped := netip.AddrPortFrom(netip.AddrFrom16(peer.Addr().As16()), peer.Port())
	other := netip.AddrPortFrom(v4.Addr(), 8081)
	tuples := []transport.Tuple{{Local: mapped, Remote: peerMapped}, {Local: v4, Remote: peer, Preset: 1}, {Local: v4, Remote: peer},
		{Local: other, Remote: peer, Preset: 2}}
	// The second preset has a keepalive time the kernel refuses (0): its
	// Blank is closed, and its connection gets a new socket.
	presets := []repair.Options{{NoDelay: true, KeepAlive: true, KeepIdle: 15, KeepIntvl: 15, KeepCnt: 9},
		{KeepAlive: true, KeepIdle: 0}}
	var r repair.Restorer
	b := startBlanks(ns.Handle(), &r, tuples, presets, []bool{true, true, false, true})
	deadline := time.Now().Add(5 * time.Second)
	for b.made.Load()+b.unpreset.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n, u := b.made.Load(), b.unpreset.Load(); n != 2 || u != 1 {
		t.Fatalf("%d Blanks made and %d closed for their preset, want 2 and 1 (the third tuple was not prelocked)", n, u)
	}
	if b.take(3) != nil {
		t.Error("take gave a Blank whose preset failed")
	}

	snap4 := goodSnapshot()
	snap6 := goodSnapshot()
	snap6.Family, snap6.Local, snap6.Remote = unix.AF_INET6, mapped, peerMapped
	bm, b4 := b.take(0), b.take(1)
	if !bm.Fits(snap6) || bm.Fits(snap4) {
		t.Errorf("the Blank of the mapped tuple fits the AF_INET6 snapshot: %v, the AF_INET one: %v; want true, false", bm.Fits(snap6), bm.Fits(snap4))
	}
	if !b4.Fits(snap4) || b4.Fits(snap6) {
		t.Errorf("the Blank of the IPv4 tuple fits the AF_INET snapshot: %v, the AF_INET6 one: %v; want true, false", b4.Fits(snap4), b4.Fits(snap6))
	}
	if p, ok := b4.Preset(); !ok || p != presets[0] {
		t.Errorf("the Blank of the tuple naming preset 1 has options %+v (preset %v), want %+v", p, ok, presets[0])
	}
	if _, ok := bm.Preset(); ok {
		t.Error("the Blank of a tuple naming no preset was preset")
	}
	if b.take(2) != nil || b.take(0) != nil {
		t.Error("take gave a Blank for a tuple without one, or the same Blank twice")
	}
	for _, bl := range []*repair.Blank{bm, b4} {
		if err := bl.Close(); err != nil {
			t.Error(err)
		}
	}
	b.release()
}

// TestBlanksBesideListener makes Blanks after a listener of their port
// exists, bound without SO_REUSEADDR, as listen does once it has recreated
// the migration's listeners: each binds (repair mode binds with the
// kernel's forced reuse, as a restore does), fits its connection's
// snapshot, and the listener still takes connections.
func TestBlanksBesideListener(t *testing.T) {
	snap := goodSnapshot()
	ns := lab.NewTestNS(t, "blanks-lsn", snap.Local.Addr())
	var lfd int
	if err := ns.Do(func() (err error) {
		lfd, err = repair.Listen(&repair.Listener{Family: unix.AF_INET, Local: snap.Local, Backlog: 4})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(lfd)
	other := netip.AddrPortFrom(snap.Remote.Addr(), snap.Remote.Port()+1)
	tuples := []transport.Tuple{{Local: snap.Local, Remote: snap.Remote}, {Local: snap.Local, Remote: other}}
	var r repair.Restorer
	b := startBlanks(ns.Handle(), &r, tuples, nil, []bool{true, true})
	defer b.release()
	deadline := time.Now().Add(5 * time.Second)
	for b.made.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := b.made.Load(); n != 2 {
		t.Fatalf("%d Blanks made beside the listener, want 2", n)
	}
	if bl := b.take(0); !bl.Fits(snap) {
		t.Error("the Blank made beside the listener does not fit its snapshot")
	} else if err := bl.Close(); err != nil {
		t.Error(err)
	}
	err := ns.Do(func() error {
		c, err := net.DialTimeout("tcp4", snap.Local.String(), 2*time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		t.Errorf("the listener beside the Blanks: %v", err)
	}
}
