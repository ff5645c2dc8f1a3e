package e2e

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/certs"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/target"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

const svcPort = 8080

var (
	peerAddr = netip.MustParsePrefix("198.18.0.1/24")
	srcAddr  = netip.MustParsePrefix("198.18.0.2/24")
	dstAddr  = netip.MustParsePrefix("198.18.0.3/24")
	svc      = netip.MustParsePrefix("198.18.0.10/24")
)

// world is the lab of the agent tests: a peer that stays put, a source host
// with the workload and its service address, and a target host, on one
// bridge; plus the workload's live streaming connections.
type world struct {
	t              *testing.T
	lan            *lab.LAN
	peer, src, dst *lab.NS

	mu      sync.Mutex
	work    map[string]*streamcheck.Endpoint // by the peer's address
	clients []*streamcheck.Endpoint
	conns   []*net.TCPConn // the workload's side, on the source

	watch *watch

	policy target.Policy // the target agent's policy (agents)
	// deliverWaves sets the target agent's DeliverWaves (agents).
	deliverWaves bool
	// deliveries lists the peers of the connections of each call of the
	// target agent's Deliver, in order (agents; guarded by mu).
	deliveries [][]netip.AddrPort
	// delivering is set while the target agent's Deliver runs (agents).
	delivering atomic.Bool
}

func newWorld(t *testing.T, n int) *world {
	t.Helper()
	return newWorldOn(t, n, svcPort)
}

// newWorldOn is newWorld with the workload listening on several ports; the
// connections are spread over them in turn.
func newWorldOn(t *testing.T, n int, ports ...uint16) *world {
	t.Helper()
	w := &world{t: t, work: map[string]*streamcheck.Endpoint{}}
	w.lan, w.peer, w.src, w.dst = lanHostsWith(t, svc)
	lns := make([]net.Listener, len(ports))
	for i, port := range ports {
		if err := w.src.Do(func() (err error) {
			lns[i], err = net.Listen("tcp", netip.AddrPortFrom(svc.Addr(), port).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer lns[i].Close()
	}
	for i := range n {
		var c net.Conn
		if err := w.peer.Do(func() (err error) {
			c, err = net.Dial("tcp", netip.AddrPortFrom(svc.Addr(), ports[i%len(ports)]).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		s, err := lns[i%len(ports)].Accept()
		if err != nil {
			t.Fatal(err)
		}
		cl, wk := streamcheck.NewEndpoint(0, 1), streamcheck.NewEndpoint(1, 0)
		cl.Interval, wk.Interval = time.Millisecond, time.Millisecond
		cl.Start(c.(*net.TCPConn))
		wk.Start(s.(*net.TCPConn))
		w.clients = append(w.clients, cl)
		w.conns = append(w.conns, s.(*net.TCPConn))
		w.work[c.LocalAddr().String()] = wk
		t.Cleanup(func() { c.Close(); s.Close() })
	}
	w.watch = startWatch(t, w.lan, w.peer, false)
	time.Sleep(200 * time.Millisecond) // let the streams run before the move
	return w
}

// recordDelivery adds to w.deliveries one delivery of n connections, the
// i-th with its peer at remote(i).
func (w *world) recordDelivery(n int, remote func(i int) netip.AddrPort) {
	peers := make([]netip.AddrPort, n)
	for i := range peers {
		r := remote(i)
		peers[i] = netip.AddrPortFrom(r.Addr().Unmap(), r.Port())
	}
	w.mu.Lock()
	w.deliveries = append(w.deliveries, peers)
	w.mu.Unlock()
}

// endpoint returns the workload endpoint of the connection with the peer at remote.
func (w *world) endpoint(remote netip.AddrPort) *streamcheck.Endpoint {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.work[netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port()).String()]
}

// check lets the streams run, then asserts that every byte arrived once and
// in order at both ends, that the peer counted no reset, and that the
// capture on the bridge saw no RST and no FIN.
func (w *world) check(run time.Duration) {
	t := w.t
	t.Helper()
	time.Sleep(run)
	for i, cl := range w.clients {
		cl.Pause()
		if err := cl.Err(); err != nil {
			t.Errorf("peer side of connection %d: %v", i, err)
		}
		if cl.Checked() == 0 {
			t.Errorf("peer side of connection %d received nothing", i)
		}
	}
	for _, wk := range w.work {
		wk.Pause()
		if err := wk.Err(); err != nil {
			t.Errorf("workload side: %v", err)
		}
	}
	w.watch.quiet(t)
	var maxGap time.Duration
	for _, cl := range w.clients {
		maxGap = max(maxGap, cl.MaxGap())
	}
	t.Logf("longest gap seen by a peer: %s", maxGap)
}

// pki mints a CA and a certificate for each agent.
func pki(t *testing.T) (src, dst *transport.Config) {
	t.Helper()
	ca, err := certs.NewCA("tcpmigrate test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	caps, err := repair.Probe()
	if err != nil {
		t.Fatal(err)
	}
	mk := func(name string) *transport.Config {
		h, err := ca.Issue(name, []string{"127.0.0.1", "198.18.0.2", "198.18.0.3"}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		tc, err := h.TLSConfig(ca)
		if err != nil {
			t.Fatal(err)
		}
		c := transport.NewConfig(tc)
		c.Capabilities = caps
		return c
	}
	return mk("source"), mk("target")
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}
