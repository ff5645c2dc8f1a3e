package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/certs"
	"github.com/tcpmigrate/tcpmigrate/internal/fdpass"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
)

// Options configure one benchmark run.
type Options struct {
	// Conns is how many connections are migrated, at least 1.
	Conns int
	// Queue is how many bytes each connection that does not stream has
	// queued each way when it is dumped: unread in its receive queue and
	// unacknowledged or unsent in its send queue. Zero means idle.
	Queue int
	// StreamConns is how many of the Conns connections stream both ways
	// (16 KiB every StreamInterval, checksummed) through the move; the
	// others are static (idle or queued). Zero streams nothing.
	StreamConns int
	// StreamInterval paces the streams; zero means DefaultStreamInterval.
	StreamInterval time.Duration
	// Calibrate is how many extra connections of the same kind are timed
	// one by one for the per-connection costs (half for the real calls,
	// half for the bare syscall sequences); zero means DefaultCalibrate.
	Calibrate int
	// ProfileDir, if set, receives a CPU profile of each process:
	// bench.pprof, source.pprof, target.pprof and peer.pprof.
	ProfileDir string
	// Child is the command line that starts this program in child mode
	// (ChildMain), such as {"/usr/bin/tcpmigrate", "bench", "child"}. Run
	// runs it inside a host's namespace with `ip netns exec`.
	Child []string
	// ChildEnv is added to the children's environment.
	ChildEnv []string
	// NoHold turns off the source agent's zero-window hold
	// (source.Config.NoHold), for a drop-only baseline.
	NoHold bool
	// NoPrecopy turns off the source agent's pre-copies
	// (source.Config.NoPrecopy): every connection is captured inside the
	// freeze, for a baseline.
	NoPrecopy bool
	// OneDelivery makes the target agent deliver every connection in one
	// call, once all are awake, instead of the busy ones first
	// (target.Config.DeliverWaves false), for a baseline.
	OneDelivery bool
	// PausedHandoff makes the workload pause its streams before it hands
	// its sockets over, as a program that is not live must (the baseline
	// of the live hand-over: docs/handoff-socket.md, PAUSE).
	PausedHandoff bool
	// Pcap, if set, is a file where tcpdump records the migrated
	// connections' segments on the bridge during the move (headers only).
	Pcap string
	// Log receives progress lines and the children's logs; nil discards
	// them.
	Log io.Writer
}

// Defaults of Options.
const (
	DefaultStreamInterval = 10 * time.Millisecond
	DefaultCalibrate      = 256
	// DefaultStreamConns is what `tcpmigrate bench --stream` streams on.
	DefaultStreamConns = 32
)

// The lab's addresses and ports.
var (
	peerAddr  = netip.MustParsePrefix("198.18.0.1/24")
	srcAddr   = netip.MustParsePrefix("198.18.0.2/24")
	dstAddr   = netip.MustParsePrefix("198.18.0.3/24")
	svcAddr   = netip.MustParsePrefix("198.18.0.10/24") // moves with the connections
	calibAddr = netip.MustParsePrefix("198.18.0.11/24") // stays on the source host
)

const (
	streamPort = 8080
	staticPort = 8081
	calibPort  = 8082
	agentPort  = 7946
	tailBytes  = 64
	// finishTimeout bounds the checks after the move, on each side.
	finishTimeout = time.Minute
	// maxErrors bounds the lines of Report.Errors.
	maxErrors = 20
)

func (o *Options) check() error {
	if o.Conns < 1 {
		return errors.New("bench: at least one connection")
	}
	if o.Queue < 0 || o.StreamConns < 0 || o.StreamConns > o.Conns || o.Calibrate < 0 || o.Calibrate == 1 {
		return fmt.Errorf("bench: bad options: queue %d, %d of %d streaming, calibrate %d", o.Queue, o.StreamConns, o.Conns, o.Calibrate)
	}
	if o.Conns > 60000 {
		return errors.New("bench: at most 60,000 connections (one peer address)")
	}
	if len(o.Child) == 0 {
		return errors.New("bench: no child command")
	}
	if os.Geteuid() != 0 {
		return errors.New("bench: needs root (network namespaces, TCP_REPAIR, nftables)")
	}
	if o.StreamInterval == 0 {
		o.StreamInterval = DefaultStreamInterval
	}
	if o.Calibrate == 0 {
		o.Calibrate = DefaultCalibrate
	}
	return nil
}

// run is one benchmark run in progress.
type run struct {
	o              *Options
	r              *Report
	dir            string
	lan            *lab.LAN
	peer, src, dst *lab.NS
	w              *workload
	children       []*child
	errs           errList
}

func (x *run) logf(format string, args ...any) {
	if x.o.Log != nil {
		fmt.Fprintf(x.o.Log, "bench: "+format+"\n", args...)
	}
}

// Run builds the lab, migrates the connections once and reports. The
// report is returned even when the run failed part-way, with what was
// measured and the error in Report.Errors; the error is non-nil when the
// run could not complete.
func Run(ctx context.Context, o Options) (*Report, error) {
	if err := o.check(); err != nil {
		return nil, err
	}
	x := &run{o: &o, r: &Report{Conns: o.Conns, QueueBytes: o.Queue, StreamConns: o.StreamConns, LiveHandoff: !o.PausedHandoff, DeliverWaves: !o.OneDelivery, Env: environment()}}
	if o.StreamConns > 0 {
		x.r.StreamIntervalUS = us(o.StreamInterval)
	}
	err := x.run(ctx)
	for _, c := range x.children {
		c.kill()
	}
	if x.lan != nil {
		x.errs.add(x.lan.Close())
	}
	if x.dir != "" {
		os.RemoveAll(x.dir)
	}
	x.errs.add(err)
	if err := x.errs.err(); err != nil {
		// One line each, and no more than maxErrors of them: a run that
		// fails on every connection says so in a few lines.
		lines := strings.Split(err.Error(), "\n")
		if len(lines) > maxErrors {
			lines = append(lines[:maxErrors], fmt.Sprintf("... and %d more", len(lines)-maxErrors))
		}
		x.r.Errors = lines
		return x.r, err
	}
	return x.r, nil
}

func (x *run) run(ctx context.Context) error {
	o := x.o
	if o.ProfileDir != "" {
		if err := os.MkdirAll(o.ProfileDir, 0o755); err != nil {
			return fmt.Errorf("bench: profile directory: %w", err)
		}
		f, err := os.Create(filepath.Join(o.ProfileDir, "bench.pprof"))
		if err != nil {
			return fmt.Errorf("bench: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			return fmt.Errorf("bench: %w", err)
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	// The bench holds every migrated connection (before the hand-over or
	// after the delivery, never both) and the calibration ones.
	if err := raiseNoFile(o.Conns + o.Calibrate + 256); err != nil {
		return err
	}
	if err := lab.Sweep(); err != nil {
		return err
	}
	var err error
	if x.dir, err = os.MkdirTemp("", "tcpmigrate-bench-"); err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	if err := x.buildLab(); err != nil {
		return err
	}
	srcTLS, dstTLS, err := writeCerts(x.dir)
	if err != nil {
		return err
	}
	if err := x.connect(ctx); err != nil {
		return err
	}
	if err := x.calibrate(); err != nil {
		return err
	}
	if o.StreamConns > 0 {
		time.Sleep(300 * time.Millisecond) // the streams reach their pace before the move
	}
	return x.migrate(ctx, srcTLS, dstTLS)
}

// buildLab makes the hosts and their addresses: the peer, the source host
// with the service address (which moves) and the calibration address
// (which stays), and the target host.
func (x *run) buildLab() error {
	lan, err := lab.NewLAN("peer", "src", "dst")
	if err != nil {
		return err
	}
	x.lan = lan
	x.peer, x.src, x.dst = lan.Host("peer"), lan.Host("src"), lan.Host("dst")
	for _, a := range []struct {
		ns *lab.NS
		p  netip.Prefix
	}{{x.peer, peerAddr}, {x.src, srcAddr}, {x.dst, dstAddr}, {x.src, svcAddr}, {x.src, calibAddr}} {
		if err := a.ns.AddAddr(a.p); err != nil {
			return err
		}
	}
	x.logf("lab: peer %s, source %s (service %s, calibration %s), target %s", peerAddr.Addr(), srcAddr.Addr(),
		svcAddr.Addr(), calibAddr.Addr(), dstAddr.Addr())
	return nil
}

// writeCerts mints a CA and a certificate for each agent into dir.
func writeCerts(dir string) (src, dst tlsFiles, err error) {
	ca, err := certs.NewCA("tcpmigrate bench CA", time.Hour)
	if err != nil {
		return src, dst, err
	}
	hosts := map[string]*certs.Host{}
	for _, name := range []string{"source", "target"} {
		if hosts[name], err = ca.Issue(name, []string{srcAddr.Addr().String(), dstAddr.Addr().String()}, time.Hour); err != nil {
			return src, dst, err
		}
	}
	if err := certs.WriteFiles(dir, ca, hosts); err != nil {
		return src, dst, err
	}
	files := func(name string) tlsFiles {
		return tlsFiles{Cert: filepath.Join(dir, name+".pem"), Key: filepath.Join(dir, name+"-key.pem"), CA: filepath.Join(dir, "ca.pem")}
	}
	return files("source"), files("target"), nil
}

func (x *run) profile(role string) string {
	if x.o.ProfileDir == "" {
		return ""
	}
	return filepath.Join(x.o.ProfileDir, role+".pprof")
}

// setupTimeout bounds each setup step: generous, as it grows with the
// number of connections and the machine may be busy.
func (x *run) setupTimeout() time.Duration {
	return 2*time.Minute + time.Duration(x.o.Conns+x.o.Calibrate)*10*time.Millisecond
}

// connect starts the peer, accepts its connections, starts the streams
// and fills the queues.
func (x *run) connect(ctx context.Context) error {
	o := x.o
	hostPort := func(a netip.Prefix, port uint16) string { return netip.AddrPortFrom(a.Addr(), port).String() }
	var lns [3]net.Listener
	for i, a := range []string{hostPort(svcAddr, streamPort), hostPort(svcAddr, staticPort), hostPort(calibAddr, calibPort)} {
		ln, err := listen(x.src, a)
		if err != nil {
			return err
		}
		defer ln.Close()
		lns[i] = ln
	}
	nStatic := o.Conns - o.StreamConns
	pc := &peerConfig{Static: hostPort(svcAddr, staticPort), Stream: hostPort(svcAddr, streamPort), Calib: hostPort(calibAddr, calibPort),
		NStatic: nStatic, NStream: o.StreamConns, NCalib: o.Calibrate, Queue: o.Queue, Interval: o.StreamInterval, Tail: tailBytes}
	peer, err := startChild(o, x.peer, childConfig{Role: rolePeer, CPUProfile: x.profile(rolePeer), Peer: pc})
	if err != nil {
		return err
	}
	x.children = append(x.children, peer)

	x.w = &workload{o: o, byID: map[connID]*wconn{}, handed: make(chan struct{}), allBack: make(chan struct{})}
	deadline := time.Now().Add(x.setupTimeout())
	var wg sync.WaitGroup
	var aerr errList
	for i, n := range []int{o.StreamConns, nStatic, o.Calibrate} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conns, err := accept(lns[i], n, deadline)
			aerr.add(err)
			switch i {
			case 0:
				x.w.stream = conns
			case 1:
				x.w.static = conns
			case 2:
				x.w.calib = conns
			}
		}()
	}
	perr := peer.recv(ctx, "ready", x.setupTimeout(), nil)
	if perr != nil {
		for _, ln := range lns {
			ln.Close() // unblock the accepts
		}
	}
	wg.Wait()
	if err := errors.Join(perr, aerr.err()); err != nil {
		return err
	}
	for _, wc := range slices.Concat(x.w.stream, x.w.static) {
		x.w.byID[wc.id] = wc
	}
	for _, wc := range x.w.stream {
		wc.ep = streamcheck.NewEndpoint(dirToPeer, dirToWorkload)
		wc.ep.Interval = o.StreamInterval
		wc.ep.SetOffsets(wc.id.base(), wc.id.base())
		wc.ep.Start(wc.c)
	}
	x.logf("%d connections up (%d streaming, %d static, %d for calibration)", o.Conns+o.Calibrate, o.StreamConns, nStatic, o.Calibrate)
	if o.Queue > 0 {
		err := parallel(slices.Concat(x.w.static, x.w.calib), 16, func(wc *wconn) error {
			return x.w.prime(wc, patternBuf(dirToPeer, wc.id.base(), 2*o.Queue+64<<10), deadline)
		})
		if err != nil {
			return err
		}
		x.logf("queues filled: %d bytes each way on %d connections", o.Queue, nStatic+o.Calibrate)
	}
	return nil
}

// calibrate times the per-connection costs on the calibration connections.
func (x *run) calibrate() error {
	fds := make([]int, len(x.w.calib))
	tuples := make([]firewall.Tuple, len(x.w.calib))
	for i, wc := range x.w.calib {
		fds[i] = fdOf(wc.c)
		tuples[i] = firewall.Tuple{Local: wc.c.LocalAddr().(*net.TCPAddr).AddrPort(), Remote: wc.c.RemoteAddr().(*net.TCPAddr).AddrPort()}
	}
	c, err := calibrate(x.src, x.dst, fds, tuples)
	if err != nil {
		return err
	}
	x.r.CalibrationConns = len(fds)
	x.r.Inspect, x.r.Dump, x.r.Restore = distOf(c.inspect), distOf(c.dump), distOf(c.restore)
	x.r.Floor = Floor{Dump: distOf(c.floorDump), Restore: distOf(c.floorRestore)}
	small, big, pclose, err := measureComponents(x.dir, x.dst, x.o.Conns)
	if err != nil {
		return err
	}
	x.r.Components = Components{LockTable: distOf(c.lockTable), LockBatch: distOf(c.lock), UnlockBatch: distOf(c.unlock),
		JournalSmall: distOf(small), JournalConns: distOf(big), PacketClose: distOf(pclose)}
	x.logf("calibrated on %d connections", len(fds))
	return nil
}

// migrate starts both agents, hands the connections over, waits for them
// to come back and checks everything.
func (x *run) migrate(ctx context.Context, srcTLS, dstTLS tlsFiles) error {
	o, r, w := x.o, x.r, x.w
	peer := x.children[0]
	tgt, err := startChild(o, x.dst, childConfig{Role: roleTarget, CPUProfile: x.profile(roleTarget), TLS: dstTLS, Target: &targetConfig{
		Listen: netip.AddrPortFrom(dstAddr.Addr(), agentPort).String(), Allow: []string{netip.PrefixFrom(svcAddr.Addr(), 32).String()},
		Claim: svcAddr.String(), Dev: "eth0", JournalDir: filepath.Join(x.dir, "journal-target"), Deliver: filepath.Join(x.dir, "deliver.sock"),
		OneDelivery: o.OneDelivery,
	}})
	if err != nil {
		return err
	}
	x.children = append(x.children, tgt)
	if err := tgt.recv(ctx, "ready", time.Minute, nil); err != nil {
		return err
	}
	dln, err := fdpass.Listen(filepath.Join(x.dir, "deliver.sock"), fdpass.Policy{Limits: fdpass.Limits{MaxBatch: fdpass.MaxBatchLimit}})
	if err != nil {
		return err
	}
	defer dln.Close()
	defer w.handedOver() // lets the deliveries go on if the hand-over failed
	go w.serveDeliveries(dln, &x.errs)
	src, err := startChild(o, x.src, childConfig{Role: roleSource, CPUProfile: x.profile(roleSource), TLS: srcTLS, Source: &sourceConfig{
		To: netip.AddrPortFrom(dstAddr.Addr(), agentPort).String(), Handoff: filepath.Join(x.dir, "handoff.sock"),
		Release: svcAddr.String(), Dev: "eth0", JournalDir: filepath.Join(x.dir, "journal-source"), NoHold: o.NoHold, NoPrecopy: o.NoPrecopy,
	}})
	if err != nil {
		return err
	}
	x.children = append(x.children, src)
	if err := src.recv(ctx, "ready", time.Minute, nil); err != nil {
		return err
	}
	resetsBefore, err := x.peer.Resets()
	if err != nil {
		return err
	}
	countersBefore, err := peerCounters(x.peer)
	if err != nil {
		return err
	}
	if o.Pcap != "" {
		stop, err := x.capture(o.Pcap)
		if err != nil {
			return err
		}
		defer stop()
	}
	if err := peer.send(peerCmd{Cmd: "mark"}); err != nil {
		return err
	}
	if err := peer.recv(ctx, "marked", time.Minute, nil); err != nil {
		return err
	}

	// The move. The workload hands every socket over live and serves on
	// until the source agent pauses it; with PausedHandoff it pauses its
	// streams first.
	x.logf("migrating %d connections", o.Conns)
	paused := time.Now()
	if o.PausedHandoff {
		var wg sync.WaitGroup
		for _, wc := range w.stream {
			wg.Add(1)
			go func() { defer wg.Done(); wc.ep.Pause() }()
		}
		wg.Wait()
	}
	if err := x.handOver(ctx, !o.PausedHandoff); err != nil {
		return err
	}
	r.HandoffUS = us(time.Since(paused))
	var sres sourceResult
	var tres targetResult
	migTimeout := 5*time.Minute + time.Duration(o.Conns)*10*time.Millisecond
	serr := src.recv(ctx, "result", migTimeout, &sres)
	terr := tgt.recv(ctx, "result", time.Minute, &tres)
	x.errs.add(errors.Join(src.finish(10*time.Second), tgt.finish(10*time.Second)))
	if err := errors.Join(serr, terr); err != nil {
		return err
	}
	x.sourceFigures(&sres)
	r.PeakRSS.Target = tres.VmHWM
	r.Premade = tres.Premade
	if sres.Error != "" || tres.Error != "" {
		x.errs.add(fmt.Errorf("bench: migration: source %s (%s), target %s (%s)", sres.State, sres.Error, tres.State, tres.Error))
	}
	select {
	case <-w.allBack:
	case <-time.After(time.Minute):
		w.mu.Lock()
		n := w.back
		w.mu.Unlock()
		return fmt.Errorf("bench: %d of %d connections came back to the workload", n, o.Conns)
	}
	w.mu.Lock()
	if !o.PausedHandoff && !w.pausedAt.IsZero() {
		// The workload's pause began at the agent's pause, and its part
		// of the hand-over is its answer. (A migration that rolled back
		// before the pause never paused it: the figures stay those of the
		// hand-over.)
		paused = w.pausedAt
		r.HandoffUS = us(w.pauseDone.Sub(w.pausedAt))
	}
	r.PauseUS = us(w.lastBack.Sub(paused))
	r.HandedBack = w.handedBack
	w.mu.Unlock()
	x.logf("migrated: %s, %d committed; the workload paused %.0f µs", sres.State, r.Committed, r.PauseUS)

	// After the move: every stream resumes, then everything is checked.
	if err := peer.send(peerCmd{Cmd: "settle"}); err != nil {
		return err
	}
	if err := peer.recv(ctx, "settled", time.Minute, nil); err != nil {
		return err
	}
	if err := x.check(ctx, peer, resetsBefore); err != nil {
		return err
	}
	after, err := peerCounters(x.peer)
	for k, v := range after {
		after[k] = v - countersBefore[k]
	}
	r.Peer.Retransmits, r.Peer.Timeouts, r.Peer.LossProbes = after["RetransSegs"], after["TCPTimeouts"], after["TCPLossProbes"]
	return err
}

// peerCounters reads the peer's retransmission counters: RetransSegs
// (/proc/net/snmp), TCPTimeouts and TCPLossProbes (/proc/net/netstat).
func peerCounters(ns *lab.NS) (map[string]int64, error) {
	m, err := ns.TCPCounters()
	if err != nil {
		return nil, err
	}
	ext, err := ns.TCPExtCounters()
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	return map[string]int64{"RetransSegs": m["RetransSegs"], "TCPTimeouts": ext["TCPTimeouts"], "TCPLossProbes": ext["TCPLossProbes"]}, nil
}

// capture records the headers of the migrated connections' segments on the
// bridge into file, from before the move until the streams have resumed.
func (x *run) capture(file string) (stop func(), err error) {
	filter := fmt.Sprintf("tcp and (port %d or port %d)", streamPort, staticPort)
	c, err := x.lan.StartCapture(filter, 128, file, func(line string) { x.logf("tcpdump: %s", line) })
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	return c.Close, nil
}

// handOver passes every migrated socket to the source agent, streams
// first, as to `send --handoff`. Handed over live, the workload keeps
// serving its streams through its own descriptors until the agent pauses
// it (which serveHandBacks answers); otherwise it keeps no copy: each
// connection is traded for a descriptor of its own before the hand-over.
func (x *run) handOver(ctx context.Context, live bool) error {
	all := slices.Concat(x.w.stream, x.w.static)
	items := make([]fdpass.Item, 0, len(all))
	defer func() { fdpass.CloseItems(items) }()
	for _, wc := range all {
		f, err := wc.c.File()
		if err != nil {
			return fmt.Errorf("bench: %w", err)
		}
		items = append(items, fdpass.Item{File: f, Local: wc.c.LocalAddr().(*net.TCPAddr).AddrPort(),
			Remote: wc.c.RemoteAddr().(*net.TCPAddr).AddrPort(), ID: uint64(wc.id)})
		if live && wc.ep != nil {
			wc.live = true
		} else {
			// f holds the socket. A static connection is not served during
			// the move: the workload lets its own descriptor go at once even
			// when live, so that the process never holds two per connection
			// (the hard descriptor limit is 20,000 here).
			wc.c.Close()
		}
	}
	dctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	conn, err := fdpass.Dial(dctx, filepath.Join(x.dir, "handoff.sock"), fdpass.Limits{MaxBatch: fdpass.MaxBatchLimit})
	if err != nil {
		return err
	}
	send := conn.SendSockets
	if live {
		send = conn.SendSocketsLive
	}
	if err := send(items); err != nil {
		conn.Close()
		return err
	}
	x.w.handedOver()
	go func() {
		x.w.serveHandBacks(conn, &x.errs)
		conn.Close()
	}()
	return nil
}

// sourceFigures fills the report from the source agent's result.
func (x *run) sourceFigures(s *sourceResult) {
	r := x.r
	r.State, r.Committed, r.Held = s.State, s.Outcomes["committed"], s.Held
	r.Precopied, r.Confirmed = s.Precopied, s.Confirmed
	r.StateBytes, r.WireBytes = s.RawBytes, s.WireBytes
	r.PeakRSS.Source = s.VmHWM
	var sw time.Duration
	var total time.Duration
	for _, p := range s.Phases {
		r.Phases = append(r.Phases, Phase{Name: p.Name, US: us(p.Duration)})
		total += p.Duration
		if p.Name == "switch" {
			sw = p.Duration
		}
	}
	r.TotalUS = us(total)
	excl := make([]time.Duration, len(s.Freeze))
	for i, f := range s.Freeze {
		excl[i] = f - sw
	}
	r.Freeze, r.FreezeExclSwitch = distOf(s.Freeze), distOf(excl)
	for _, e := range s.ConnErrs {
		x.errs.add(errors.New(e))
	}
}

// check verifies every connection from both ends, collects the peer's
// measurements and its reset counters.
func (x *run) check(ctx context.Context, peer *child, resetsBefore int64) error {
	o, r, w := x.o, x.r, x.w
	expect := map[connID]int64{}
	for _, wc := range w.static {
		expect[wc.id] = wc.written + tailBytes
	}
	if err := peer.send(peerCmd{Cmd: "finish", Expect: expect}); err != nil {
		return err
	}
	verified := map[connID]bool{}
	var mu sync.Mutex
	var werr errList
	var fromPeer int64
	// One deadline for all: a connection that is dead (a rolled-back one
	// whose address moved away) must not hold up the others.
	deadline := time.Now().Add(finishTimeout)
	parallel(w.static, 64, func(wc *wconn) error {
		tail := patternBuf(dirToPeer, wc.id.base()+wc.written, tailBytes)
		want := patternBuf(dirToWorkload, wc.id.base(), o.Queue+tailBytes)
		if err := w.finishStatic(wc, tail, want, deadline); err != nil {
			werr.add(err)
			return nil
		}
		mu.Lock()
		verified[wc.id] = true
		fromPeer += int64(len(want))
		mu.Unlock()
		return nil
	})
	var pres peerResult
	perr := peer.recv(ctx, "done", x.setupTimeout(), &pres)
	var wg sync.WaitGroup
	for _, wc := range w.stream {
		if wc.back {
			wg.Add(1)
			go func() { defer wg.Done(); wc.ep.Pause() }()
		}
	}
	wg.Wait()
	for _, wc := range w.stream {
		switch {
		case !wc.back:
			werr.add(fmt.Errorf("bench: stream %s never came back to the workload", wc.id))
		case wc.ep.Err() != nil:
			werr.add(fmt.Errorf("bench: stream %s, workload side: %w", wc.id, wc.ep.Err()))
		case wc.ep.Checked() <= wc.id.base(): // offsets start at the stream's base
			werr.add(fmt.Errorf("bench: stream %s: the workload received nothing", wc.id))
		default:
			verified[wc.id] = true
			fromPeer += wc.ep.Checked() - wc.id.base()
		}
	}
	resetsAfter, rerr := x.peer.Resets()
	x.errs.add(errors.Join(werr.err(), rerr))
	if perr != nil {
		return perr
	}
	x.errs.add(peer.finish(10 * time.Second))
	for _, e := range pres.Errors {
		x.errs.add(errors.New("peer: " + e))
	}
	for _, p := range pres.Verified {
		if verified[p] {
			r.Peer.Verified++
		}
	}
	r.Peer.Resets = resetsAfter - resetsBefore
	r.Peer.ToPeer, r.Peer.FromPeer = pres.ToPeer, fromPeer
	r.PeakRSS.Peer = pres.VmHWM
	if o.StreamConns > 0 {
		var arrival, acked, received []time.Duration
		st := &Stall{}
		for _, s := range pres.Streams {
			arrival, acked, received = append(arrival, s.MaxGap), append(acked, s.Acked), append(received, s.Received)
			if !s.Resumed {
				st.Unresolved++
			}
		}
		st.Arrival, st.Acked, st.Received = distOf(arrival), distOf(acked), distOf(received)
		r.Stall = st
	}
	r.PeakRSS.Bench, _ = vmHWM()
	r.Env.LoadAfter = loadAvg()
	return nil
}
