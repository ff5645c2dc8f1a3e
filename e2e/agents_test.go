package e2e

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/source"
	"github.com/tcpmigrate/tcpmigrate/target"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// agents starts a target agent restoring into the world's target host and
// returns the source configuration that migrates to it. The switch moves
// the service address from the source host to the target host.
func (w *world) agents(allow []netip.Prefix, srcFault func(source.Step) error, dstFault func(target.Step) error) (source.Config, *target.Server) {
	t := w.t
	t.Helper()
	srcTC, dstTC := pki(t)
	srv, err := target.NewServer(target.Config{
		Transport:  dstTC,
		NetNS:      w.dst.Handle(),
		Allow:      allow,
		Policy:     w.policy,
		JournalDir: t.TempDir(),
		Claim: func(_ context.Context, _ []netip.Prefix) error {
			if err := w.dst.AddAddr(svc); err != nil {
				return err
			}
			return w.peer.FlushNeigh(svc.Addr())
		},
		Unclaim:      func(_ context.Context, _ []netip.Prefix) error { return w.dst.DelAddr(svc) },
		DeliverWaves: w.deliverWaves,
		Deliver: func(_ context.Context, conns []*target.Delivered) map[uint32]error {
			if !w.delivering.CompareAndSwap(false, true) {
				t.Error("Deliver called while another call was running")
			}
			defer w.delivering.Store(false)
			w.recordDelivery(len(conns), func(i int) netip.AddrPort { return conns[i].Remote })
			failed := map[uint32]error{}
			for _, d := range conns {
				ep := w.endpoint(d.Remote)
				c, err := d.Conn()
				if err != nil || ep == nil {
					failed[d.Index] = err
					continue
				}
				ep.Start(c.(*net.TCPConn))
			}
			return failed
		},
		Fault: dstFault,
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := transport.Listen("127.0.0.1:0", dstTC)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go srv.Serve(ctx, ln)
	return source.Config{
		To:         ln.Addr().String(),
		Transport:  srcTC,
		NetNS:      w.src.Handle(),
		Lease:      5 * time.Second,
		Timeout:    10 * time.Second,
		JournalDir: t.TempDir(),
		Switch:     func(context.Context) error { return w.src.DelAddr(svc) },
		Unswitch: func(context.Context) error {
			if err := w.src.AddAddr(svc); err != nil {
				return err
			}
			return w.peer.FlushNeigh(svc.Addr())
		},
		Fault: srcFault,
	}, srv
}

// TestGoAPIDeliverWaves moves connections of which half stream and half
// have been idle for a while, handed over live (the owner pauses each
// wave when asked), so that the source copies the idle ones before its
// lock and captures the streaming ones after it. With DeliverWaves the
// target hands the streaming ones to the application in a first Deliver
// call of their own, then the idle ones; without it, all in one call;
// never two calls at once. Every byte still arrives once, in order, with
// no reset.
func TestGoAPIDeliverWaves(t *testing.T) {
	for _, waves := range []bool{true, false} {
		name := "waves"
		if !waves {
			name = "one"
		}
		t.Run(name, func(t *testing.T) {
			w := newWorld(t, 8)
			w.deliverWaves = waves
			idle, restart := w.quieten(4)
			cfg, _ := w.agents([]netip.Prefix{svc}, nil, nil)
			res, err := source.Migrate(ctxT(t), cfg, w.handOverLive(&cfg))
			if err != nil {
				t.Fatalf("migrate: %v", err)
			}
			for _, c := range res.Conns {
				if c.Outcome != source.Committed {
					t.Errorf("connection %d: %s (%v)", c.Index, c.Outcome, c.Err)
				}
			}
			t.Logf("%d held, %d pre-copied, %d confirmed", res.Held, res.Precopied, res.Confirmed)
			if res.Precopied != len(idle) || res.Confirmed != len(idle) {
				t.Fatalf("%d pre-copied and %d confirmed, want the %d idle connections each", res.Precopied, res.Confirmed, len(idle))
			}
			w.expectDeliveries(idle, waves)
			restart()
			w.check(500 * time.Millisecond)
		})
	}
}

// quieten stops the streams of the world's first n connections at both
// ends, then waits three times source.DefaultQuietFor, so that the source
// finds them quiet. It returns their peers' addresses, and restart, which
// starts those streams again at the peers (the workload's ends start
// again at their delivery).
func (w *world) quieten(n int) (idle map[netip.AddrPort]bool, restart func()) {
	idle = map[netip.AddrPort]bool{}
	for _, cl := range w.clients[:n] {
		peer := cl.Conn().LocalAddr().(*net.TCPAddr).AddrPort()
		cl.Pause()
		w.endpoint(peer).Pause()
		idle[peer] = true
	}
	time.Sleep(3 * source.DefaultQuietFor)
	return idle, func() {
		for _, cl := range w.clients[:n] {
			cl.Start(cl.Conn())
		}
	}
}

// expectDeliveries checks the calls of the target's Deliver (or the
// deliveries to the workload's new instance): with waves, one of the
// connections that streamed, then one of the idle ones; without, one of
// all of them.
func (w *world) expectDeliveries(idle map[netip.AddrPort]bool, waves bool) {
	t := w.t
	t.Helper()
	w.mu.Lock()
	calls := slices.Clone(w.deliveries)
	w.mu.Unlock()
	// Per delivery, whether its connections may be idle ones, and how many.
	want, sizes := [][]bool{{false, true}}, []int{len(w.clients)}
	if waves {
		want, sizes = [][]bool{{false}, {true}}, []int{len(w.clients) - len(idle), len(idle)}
	}
	if len(calls) != len(want) {
		t.Fatalf("%d deliveries (%v), want %d", len(calls), calls, len(want))
	}
	for i, call := range calls {
		if len(call) != sizes[i] {
			t.Errorf("delivery %d had %d connections, want %d", i, len(call), sizes[i])
		}
		for _, p := range call {
			if !slices.Contains(want[i], idle[p]) {
				t.Errorf("delivery %d had %v (idle: %t)", i, p, idle[p])
			}
		}
	}
}

// handOverLive hands the workload's sockets to the source agent while it
// goes on serving them: cfg.Pause pauses those the agent names, in as many
// waves as it asks for.
func (w *world) handOverLive(cfg *source.Config) []source.Conn {
	var conns []source.Conn
	for _, c := range w.conns {
		f, err := c.File()
		if err != nil {
			w.t.Fatal(err)
		}
		conns = append(conns, source.Conn{File: f})
	}
	cfg.PauseWaves = true
	cfg.Pause = func(_ context.Context, idx []int) ([][]byte, error) {
		for _, i := range idx {
			w.endpoint(w.conns[i].RemoteAddr().(*net.TCPAddr).AddrPort()).Pause()
		}
		return nil, nil
	}
	return conns
}

// handOver pauses the workload and hands its sockets to the source agent.
// After a rollback, restart resumes the workload on its own sockets.
func (w *world) handOver() []source.Conn {
	var conns []source.Conn
	for _, c := range w.conns {
		w.endpoint(c.RemoteAddr().(*net.TCPAddr).AddrPort()).Pause()
		f, err := c.File()
		if err != nil {
			w.t.Fatal(err)
		}
		conns = append(conns, source.Conn{File: f})
	}
	return conns
}

func (w *world) restart(res *source.Result) {
	for i, c := range w.conns {
		if res.Conns[i].Outcome == source.RolledBack {
			w.endpoint(c.RemoteAddr().(*net.TCPAddr).AddrPort()).Start(c)
		}
	}
}

// TestGoAPIMigration moves live, streaming connections with the Go API of
// both agents: every one is committed, the workload carries on at the
// target, the peers verify every byte and nobody sees a reset.
func TestGoAPIMigration(t *testing.T) {
	w := newWorld(t, 16)
	cfg, _ := w.agents([]netip.Prefix{svc}, nil, nil)
	res, err := source.Migrate(ctxT(t), cfg, w.handOver())
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	for _, c := range res.Conns {
		if c.Outcome != source.Committed {
			t.Errorf("connection %d %s->%s: %s: %v", c.Index, c.Local, c.Remote, c.Outcome, c.Err)
		}
	}
	t.Logf("state %s, phases %v, raw %d bytes, wire %d bytes, freeze %s, %d held", res.State, res.Phases, res.RawBytes, res.WireBytes, res.Conns[0].Freeze, res.Held)
	// Each freeze ends at the target's resume of the connection, placed on
	// the source's clock: after the switch, before COMMITTED came back.
	var sw, frozen time.Duration // the switch phase; lock to COMMITTED
	inFreeze := false
	for _, p := range res.Phases {
		inFreeze = inFreeze || p.Name == "dump+restore"
		if inFreeze && (p.Name == "dump+restore" || p.Name == "switch" || p.Name == "commit") {
			frozen += p.Duration
		}
		if p.Name == "switch" {
			sw = p.Duration
		}
	}
	for _, c := range res.Conns {
		if c.Freeze <= sw || c.Freeze > frozen {
			t.Errorf("connection %d: freeze %s, want within (%s, %s]: after the switch, before COMMITTED", c.Index, c.Freeze, sw, frozen)
		}
	}
	// The source copies are closed (in repair mode: silently).
	for _, c := range w.conns {
		c.Close()
	}
	w.check(500 * time.Millisecond)
}

// TestRefusedRollsBack has the target refuse every connection (its
// allow-list does not hold the service address): each is rolled back at
// the source and carries on there, and the peer sees no reset.
func TestRefusedRollsBack(t *testing.T) {
	w := newWorld(t, 8)
	cfg, _ := w.agents([]netip.Prefix{netip.MustParsePrefix("198.19.0.0/16")}, nil, nil)
	res, err := source.Migrate(ctxT(t), cfg, w.handOver())
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	for _, c := range res.Conns {
		if c.Outcome != source.RolledBack || c.Err == nil {
			t.Errorf("connection %d: %s (%v), want rolled back with the target's reason", c.Index, c.Outcome, c.Err)
		}
	}
	w.restart(res)
	w.check(300 * time.Millisecond)
}

// TestPartialRefusalAbortsWhenTheAddressMoves has the target refuse half the
// connections (those on a port its policy does not allow). Those would stay
// on the source, but the switch takes the service address away from it, so
// the source aborts the whole migration instead: everything carries on at
// the source and nobody sees a reset.
func TestPartialRefusalAbortsWhenTheAddressMoves(t *testing.T) {
	w := newWorldOn(t, 8, svcPort, svcPort+1)
	w.policy.AllowPorts = []uint16{svcPort}
	cfg, _ := w.agents([]netip.Prefix{svc}, nil, nil)
	res, err := source.Migrate(ctxT(t), cfg, w.handOver())
	if err == nil {
		t.Fatal("a migration with refused connections and an address move did not abort")
	}
	for _, c := range res.Conns {
		if c.Outcome != source.RolledBack {
			t.Errorf("connection %d: %s (%v), want rolled back", c.Index, c.Outcome, c.Err)
		}
	}
	w.restart(res)
	w.check(300 * time.Millisecond)
}

// TestHoldDefaultAndOff migrates streaming connections twice: by default
// the source holds every one with a zero window before its lock (this
// machine's kernel and target advertise what the hold needs), and with
// Config.NoHold none; both times every byte arrives and nobody sees a
// reset.
func TestHoldDefaultAndOff(t *testing.T) {
	for _, noHold := range []bool{false, true} {
		w := newWorld(t, 8)
		cfg, _ := w.agents([]netip.Prefix{svc}, nil, nil)
		cfg.NoHold = noHold
		conns := w.handOver()
		res, err := source.Migrate(ctxT(t), cfg, conns)
		if err != nil {
			t.Fatalf("migrate (no hold %v): %v", noHold, err)
		}
		want := len(conns)
		if noHold {
			want = 0
		}
		if res.Held != want {
			t.Errorf("no hold %v: %d connections held, want %d", noHold, res.Held, want)
		}
		for _, c := range w.conns {
			c.Close()
		}
		w.check(300 * time.Millisecond)
	}
}

// TestGoAPIPauseNamesTheCallersConns moves connections handed over live
// together with a listener whose accept queue holds two connections:
// Config.Pause is given the indices of the caller's connections only
// (those it passed to Migrate), never those Migrate accepted itself (their
// indices are past the caller's: send --handoff would index out of range).
// Its answer with too few states rolls everything back.
func TestGoAPIPauseNamesTheCallersConns(t *testing.T) {
	w := newWorld(t, 4)
	cfg, _ := w.agents([]netip.Prefix{svc}, nil, nil)
	var ln *net.TCPListener
	if err := w.src.Do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(false) // Go's default listener is MPTCP, which does not move
		l, err := lc.Listen(context.Background(), "tcp4", netip.AddrPortFrom(svc.Addr(), svcPort+1).String())
		ln, _ = l.(*net.TCPListener)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for range 2 {
		if err := w.peer.Do(func() error {
			c, err := net.Dial("tcp4", ln.Addr().String())
			if err == nil {
				t.Cleanup(func() { c.Close() })
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	lf, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	cfg.Listeners = []source.Listener{{File: lf, OwnerFD: -1}}
	conns := w.handOver()
	var named []int
	cfg.Pause = func(_ context.Context, idx []int) ([][]byte, error) {
		named = append(named, idx...)
		return make([][]byte, len(idx)-1), nil
	}
	res, err := source.Migrate(ctxT(t), cfg, conns)
	if err == nil {
		t.Fatal("a pause answered with too few states did not fail the migration")
	}
	if len(res.Conns) != len(conns)+2 {
		t.Fatalf("%d connections in the result, want %d and the 2 pending (%v)", len(res.Conns), len(conns), err)
	}
	if len(named) != len(conns) {
		t.Errorf("Pause was given %v, want the %d connections the caller passed", named, len(conns))
	}
	for _, i := range named {
		if i < 0 || i >= len(conns) {
			t.Errorf("Pause was given index %d, not one of the caller's %d connections", i, len(conns))
		}
	}
	w.restart(res)
	for i, c := range res.Conns[:len(conns)] {
		if c.Outcome != source.RolledBack {
			t.Errorf("connection %d: %s (%v), want rolled back", i, c.Outcome, c.Err)
		}
	}
}

// TestGoAPIPrecopy makes every connection quiet enough to be pre-copied
// (Config.QuietFor < 0): the source captures each before its lock and the
// target restores the copies ahead of the freeze. Then, twice: with the
// lock right after the copies, and with a pause of 600 ms between them
// (StepPrecopied), in which the streaming peers, held at window 0, send
// their persist probes: each such connection moved, so it is captured
// again after the lock and the target replaces its copy. Either way every
// connection is committed, and the peers verify every byte and see no
// reset.
func TestGoAPIPrecopy(t *testing.T) {
	for _, moved := range []bool{false, true} {
		name := "confirmed"
		if moved {
			name = "moved"
		}
		t.Run(name, func(t *testing.T) {
			w := newWorld(t, 8)
			var fault func(source.Step) error
			if moved {
				fault = func(s source.Step) error {
					if s == source.StepPrecopied {
						time.Sleep(600 * time.Millisecond)
					}
					return nil
				}
			}
			cfg, _ := w.agents([]netip.Prefix{svc}, fault, nil)
			cfg.QuietFor = -1
			conns := w.handOver()
			res, err := source.Migrate(ctxT(t), cfg, conns)
			if err != nil {
				t.Fatalf("migrate: %v", err)
			}
			for _, c := range res.Conns {
				if c.Outcome != source.Committed {
					t.Errorf("connection %d: %s (%v)", c.Index, c.Outcome, c.Err)
				}
			}
			t.Logf("%d held, %d pre-copied, %d confirmed; phases %v", res.Held, res.Precopied, res.Confirmed, res.Phases)
			if res.Precopied != len(conns) {
				t.Errorf("%d of %d connections pre-copied", res.Precopied, len(conns))
			}
			if moved && res.Confirmed == res.Precopied {
				t.Errorf("all %d pre-copies stood although the held peers probed for 600 ms", res.Confirmed)
			}
			if !moved && res.Confirmed == 0 {
				t.Errorf("none of %d pre-copies stood with the lock right after them", res.Precopied)
			}
			for _, c := range w.conns {
				c.Close()
			}
			w.check(500 * time.Millisecond)
		})
	}
}
