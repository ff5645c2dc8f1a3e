// Package demo is the self-contained demonstration behind `tcpmigrate demo`:
// it builds a lab of network namespaces (a peer, a source host and a target
// host on a bridge), runs a workload whose connections stream checksummed
// data both ways with a peer, migrates every connection from the source to
// the target while the streams run, verifies every byte, and reports.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/addrmove"
	"github.com/tcpmigrate/tcpmigrate/internal/certs"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/source"
	"github.com/tcpmigrate/tcpmigrate/target"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// Options configure a demo run.
type Options struct {
	// Conns is how many connections the workload serves and migrates.
	Conns int
	// Before and After are how long the streams run before and after the move.
	Before, After time.Duration
	// Log receives progress lines; nil discards them.
	Log io.Writer
}

// Report is what a demo run measured.
type Report struct {
	Conns int
	// Freeze is each connection's freeze window: from its source lock to
	// its target unlock.
	Freeze []time.Duration
	// Stall is, for each connection, the longest gap between bytes
	// arriving at the peer over the whole run.
	Stall []time.Duration
	// StallIn is, for each connection, the longest gap between bytes from
	// the peer arriving at the workload (on the source, then the target):
	// how long the peer's own sending was held up.
	StallIn []time.Duration
	// ToPeer and FromPeer are the bytes verified at each end.
	ToPeer, FromPeer int64
	// StateBytes is the size of the connection state moved (queues included).
	StateBytes int64
	// PeerResets is the change in the peer's TCP reset counters.
	PeerResets int64
}

const svcPort = 8080

// Run builds the lab, migrates the workload's connections and tears the lab
// down again, also on error.
func Run(ctx context.Context, o Options) (*Report, error) {
	if o.Log == nil {
		o.Log = io.Discard
	}
	logf := func(format string, args ...any) { fmt.Fprintf(o.Log, format+"\n", args...) }
	if err := lab.Sweep(); err != nil {
		return nil, err
	}
	lan, err := lab.NewLAN("peer", "src", "dst")
	if err != nil {
		return nil, err
	}
	defer lan.Close()
	peer, src, dst := lan.Host("peer"), lan.Host("src"), lan.Host("dst")
	svc := netip.MustParsePrefix("198.18.0.10/24")
	for ns, p := range map[*lab.NS]string{peer: "198.18.0.1/24", src: "198.18.0.2/24", dst: "198.18.0.3/24"} {
		if err := ns.AddAddr(netip.MustParsePrefix(p)); err != nil {
			return nil, err
		}
	}
	if err := src.AddAddr(svc); err != nil {
		return nil, err
	}
	logf("lab: peer 198.18.0.1, source 198.18.0.2, target 198.18.0.3; service %s on the source", svc.Addr())

	// The workload on the source and its clients on the peer.
	var ln net.Listener
	if err := src.Do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(svc.Addr(), svcPort).String())
		return err
	}); err != nil {
		return nil, err
	}
	defer ln.Close()
	work := make([]*streamcheck.Endpoint, o.Conns)
	clients := make([]*streamcheck.Endpoint, o.Conns)
	conns := make([]*net.TCPConn, o.Conns)
	for i := range o.Conns {
		var c net.Conn
		if err := peer.Do(func() (err error) {
			c, err = net.Dial("tcp", netip.AddrPortFrom(svc.Addr(), svcPort).String())
			return err
		}); err != nil {
			return nil, err
		}
		defer c.Close()
		s, err := ln.Accept()
		if err != nil {
			return nil, err
		}
		conns[i] = s.(*net.TCPConn)
		clients[i], work[i] = streamcheck.NewEndpoint(0, 1), streamcheck.NewEndpoint(1, 0)
		clients[i].Interval, work[i].Interval = time.Millisecond, time.Millisecond
		clients[i].Start(c.(*net.TCPConn))
		work[i].Start(conns[i])
	}
	resetsBefore, err := peer.Resets()
	if err != nil {
		return nil, err
	}
	logf("workload: %d connections streaming both ways; running %s before the move", o.Conns, o.Before)
	if err := sleep(ctx, o.Before); err != nil {
		return nil, err
	}

	freeze, state, err := migrate(ctx, lan, svc, work, conns, logf)
	if err != nil {
		return nil, err
	}
	logf("moved: the workload carries on on the target; running %s more", o.After)
	if err := sleep(ctx, o.After); err != nil {
		return nil, err
	}

	r := &Report{Conns: o.Conns, StateBytes: state}
	var errs []error
	for i := range o.Conns {
		work[i].Pause()
		clients[i].Pause()
		for _, e := range []*streamcheck.Endpoint{work[i], clients[i]} {
			if err := e.Err(); err != nil {
				errs = append(errs, fmt.Errorf("connection %d: %w", i, err))
			}
		}
		r.Freeze = append(r.Freeze, freeze[i])
		r.Stall = append(r.Stall, clients[i].MaxGap())
		r.StallIn = append(r.StallIn, work[i].MaxGap())
		r.ToPeer += clients[i].Checked()
		r.FromPeer += work[i].Checked()
	}
	// Counted before anything is closed: closing a socket with unread data
	// resets its peer, which is the demo's doing, not the migration's.
	resetsAfter, err := peer.Resets()
	if err != nil {
		return nil, err
	}
	r.PeerResets = resetsAfter - resetsBefore
	for _, w := range work {
		w.Conn().Close()
	}
	return r, errors.Join(errs...)
}

// migrate moves every connection of the workload from the source host to
// the target host with both agents (the Go API of `tcpmigrate send` and
// `receive`): the workload's goroutines stop at exact offsets, hand their
// sockets over with those offsets as application state, and new goroutines
// on the target carry on from them.
func migrate(ctx context.Context, lan *lab.LAN, svc netip.Prefix, work []*streamcheck.Endpoint, conns []*net.TCPConn, logf func(string, ...any)) ([]time.Duration, int64, error) {
	src, dst := lan.Host("src"), lan.Host("dst")
	ca, err := certs.NewCA("tcpmigrate demo CA", time.Hour)
	if err != nil {
		return nil, 0, err
	}
	tlsFor := func(name string) (*transport.Config, error) {
		h, err := ca.Issue(name, []string{"127.0.0.1"}, time.Hour)
		if err != nil {
			return nil, err
		}
		tc, err := h.TLSConfig(ca)
		if err != nil {
			return nil, err
		}
		c := transport.NewConfig(tc)
		c.Capabilities, err = repair.Probe()
		return c, err
	}
	srcTLS, err := tlsFor("source")
	if err != nil {
		return nil, 0, err
	}
	dstTLS, err := tlsFor("target")
	if err != nil {
		return nil, 0, err
	}
	journals, err := os.MkdirTemp("", "tcpmigrate-demo")
	if err != nil {
		return nil, 0, err
	}
	defer os.RemoveAll(journals)

	byPeer := map[netip.AddrPort]*streamcheck.Endpoint{}
	for i, c := range conns {
		byPeer[c.RemoteAddr().(*net.TCPAddr).AddrPort()] = work[i]
	}
	claim := addrmove.Config{Prefix: svc, Dev: "eth0", NetNS: dst.Handle()}
	release := addrmove.Config{Prefix: svc, Dev: "eth0", NetNS: src.Handle()}
	srv, err := target.NewServer(target.Config{
		Transport:  dstTLS,
		NetNS:      dst.Handle(),
		Allow:      []netip.Prefix{netip.PrefixFrom(svc.Addr(), 32)},
		JournalDir: filepath.Join(journals, "target"),
		Claim:      func(ctx context.Context, _ []netip.Prefix) error { return addrmove.Claim(ctx, claim) },
		Unclaim:    func(ctx context.Context, _ []netip.Prefix) error { return addrmove.Release(ctx, claim) },
		Deliver: func(_ context.Context, ds []*target.Delivered) map[uint32]error {
			failed := map[uint32]error{}
			for _, d := range ds {
				c, err := d.Conn()
				ep := byPeer[d.Remote]
				if err == nil && ep == nil {
					err = errors.New("no workload connection with this peer")
				}
				if err == nil {
					err = ep.SetState(d.AppState)
				}
				if err != nil {
					failed[d.Index] = fmt.Errorf("cannot adopt %s: %v", d.Remote, err)
					continue
				}
				ep.Start(c.(*net.TCPConn))
			}
			return failed
		},
	})
	if err != nil {
		return nil, 0, err
	}
	ln, err := transport.Listen("127.0.0.1:0", dstTLS)
	if err != nil {
		return nil, 0, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go srv.Serve(ctx, ln)

	// The workload stops at exact offsets and hands its sockets over.
	handed := make([]source.Conn, len(conns))
	for i, c := range conns {
		work[i].Pause()
		f, err := c.File()
		if err != nil {
			return nil, 0, err
		}
		handed[i] = source.Conn{File: f, AppState: work[i].State()}
	}
	res, err := source.Migrate(ctx, source.Config{
		To: ln.Addr().String(), Transport: srcTLS, NetNS: src.Handle(),
		JournalDir:  filepath.Join(journals, "source"),
		SwitchAddrs: []netip.Prefix{svc},
		Switch:      func(ctx context.Context) error { return addrmove.Release(ctx, release) },
		Unswitch:    func(ctx context.Context) error { return addrmove.Claim(ctx, release) },
		Progress: func(done, total int) {
			if done == total || done%max(1, total/4) == 0 {
				logf("  captured %d/%d connections", done, total)
			}
		},
	}, handed)
	if err != nil {
		return nil, 0, err
	}
	freeze := make([]time.Duration, len(res.Conns))
	for i, cr := range res.Conns {
		if cr.Outcome != source.Committed {
			return nil, 0, fmt.Errorf("connection %s: %s: %v", cr.Remote, cr.Outcome, cr.Err)
		}
		freeze[i] = cr.Freeze
		conns[i].Close() // the source copy, in repair mode: closes silently
	}
	var phases []string
	for _, p := range res.Phases {
		phases = append(phases, p.Name+" "+p.Duration.Round(time.Microsecond).String())
	}
	logf("migrated %d connections: %s; %d bytes of state, %d on the wire", len(conns), strings.Join(phases, ", "), res.RawBytes, res.WireBytes)
	return freeze, res.RawBytes, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
