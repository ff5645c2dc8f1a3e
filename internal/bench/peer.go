package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
)

// Pattern directions: the peer writes dirToWorkload, the workload writes
// dirToPeer (streamcheck.Pattern).
const (
	dirToWorkload = 0
	dirToPeer     = 1
)

// peerConfig configures the peer's child. It runs inside the peer host's
// namespace and dials every connection.
type peerConfig struct {
	// Static, Stream and Calib are the addresses to dial for each kind of
	// connection, and NStatic, NStream and NCalib how many of each.
	Static  string `json:"static"`
	Stream  string `json:"stream"`
	Calib   string `json:"calib"`
	NStatic int    `json:"n_static"`
	NStream int    `json:"n_stream"`
	NCalib  int    `json:"n_calib"`
	// Queue is how many bytes the peer writes on each static and
	// calibration connection before the move (the workload does not read
	// them), with a small receive buffer so that what the workload writes
	// stays queued at the workload.
	Queue int `json:"queue"`
	// Interval paces the streams: 16 KiB every Interval, each way.
	Interval time.Duration `json:"interval"`
	// Tail is how many bytes each side writes on a static connection after
	// the move, to show it alive both ways.
	Tail int `json:"tail"`
}

// connID names a connection by its two ports: the service's (which tells
// its kind) and the peer's. The peer's port alone is not enough: the peer
// may use one local port towards two service ports.
type connID uint32

func newConnID(servicePort, peerPort int) connID { return connID(servicePort)<<16 | connID(peerPort) }

// String returns the connection's name, "peer port→service port".
func (id connID) String() string { return fmt.Sprintf("%d→%d", id&0xffff, id>>16) }

// base is where the connection's byte streams start (streamcheck.Pattern
// offsets, both directions): each connection carries bytes of its own, so
// that no compressor finds one connection's queue in another's.
func (id connID) base() int64 { return int64(id) << 24 }

// peerCmd is a command of the bench to the peer.
type peerCmd struct {
	// Cmd is "mark" (the move is about to start: sample the streams),
	// "settle" (the move is over: wait until every stream has resumed) or
	// "finish" (verify everything and report).
	Cmd string `json:"cmd"`
	// Expect is, for finish, the bytes the workload wrote on each static
	// connection.
	Expect map[connID]int64 `json:"expect,omitempty"`
}

// streamStat is what the peer measured on one streaming connection.
type streamStat struct {
	ID       connID        `json:"id"`
	MaxGap   time.Duration `json:"max_gap"`
	Acked    time.Duration `json:"acked_gap"`
	Received time.Duration `json:"received_gap"`
	Resumed  bool          `json:"resumed"`
	Checked  int64         `json:"checked"`
	Sent     int64         `json:"sent"`
}

// peerResult is the peer's report, at finish.
type peerResult struct {
	event
	Streams []streamStat `json:"streams"`
	// Verified are the connections whose every byte the peer verified.
	Verified []connID `json:"verified"`
	// ToPeer is the bytes the peer verified.
	ToPeer int64    `json:"to_peer"`
	Errors []string `json:"errors,omitempty"`
	VmHWM  int64    `json:"vm_hwm"`
}

type peerConn struct {
	c  *net.TCPConn
	id connID
	ep *streamcheck.Endpoint

	// The sampler's books, during the move.
	acked, received gapMeter
	// settleAcked and settleReceived say whether each counter moved after
	// settle began: the stream resumed after the move.
	settleAcked, settleReceived bool
}

// gapMeter tracks the longest time a counter did not move.
type gapMeter struct {
	last    uint64
	changed time.Time
	max     time.Duration
}

func (g *gapMeter) start(v uint64, now time.Time) { g.last, g.changed, g.max = v, now, 0 }

// sample records v at now and reports whether it moved.
func (g *gapMeter) sample(v uint64, now time.Time) bool {
	if v == g.last {
		return false
	}
	g.max = max(g.max, now.Sub(g.changed))
	g.last, g.changed = v, now
	return true
}

// stop closes the open gap at now.
func (g *gapMeter) stop(now time.Time) { g.max = max(g.max, now.Sub(g.changed)) }

func runPeer(ctx context.Context, cfg *peerConfig, dec *json.Decoder, enc *json.Encoder) error {
	if err := raiseNoFile(cfg.NStatic + cfg.NStream + cfg.NCalib + 64); err != nil {
		return err
	}
	small := cfg.Queue > 0
	static, err := dialMany(cfg.Static, cfg.NStatic, small)
	if err != nil {
		return err
	}
	calib, err := dialMany(cfg.Calib, cfg.NCalib, small)
	if err != nil {
		return err
	}
	// Nothing else refers to the calibration connections: without this,
	// the garbage collector would close them (with unread data: a reset)
	// in the middle of the run.
	defer runtime.KeepAlive(calib)
	if cfg.Queue > 0 {
		// What the workload will find unread in its receive queues.
		err := parallel(append(append([]*peerConn(nil), static...), calib...), 32, func(pc *peerConn) error {
			pc.c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			_, err := pc.c.Write(patternBuf(dirToWorkload, pc.id.base(), cfg.Queue))
			return err
		})
		if err != nil {
			return fmt.Errorf("bench: peer: queue bytes (the workload's receive queues did not take them: TCP memory pressure?): %w", err)
		}
	}
	streams, err := dialMany(cfg.Stream, cfg.NStream, false)
	if err != nil {
		return err
	}
	for _, pc := range streams {
		pc.ep = streamcheck.NewEndpoint(dirToWorkload, dirToPeer)
		pc.ep.Interval = cfg.Interval
		pc.ep.SetOffsets(pc.id.base(), pc.id.base())
		pc.ep.Start(pc.c)
	}
	if err := enc.Encode(event{Event: "ready"}); err != nil {
		return err
	}

	var sampler *streamSampler
	for {
		var cmd peerCmd
		if err := dec.Decode(&cmd); err == io.EOF {
			return nil
		} else if err != nil {
			return fmt.Errorf("bench: peer: command: %w", err)
		}
		switch cmd.Cmd {
		case "mark":
			sampler = startSampler(streams)
			err = enc.Encode(event{Event: "marked"})
		case "settle":
			if sampler == nil {
				return fmt.Errorf("bench: peer: settle before mark")
			}
			sampler.settle(15 * time.Second)
			err = enc.Encode(event{Event: "settled"})
		case "finish":
			err = enc.Encode(finishPeer(cfg, static, streams, cmd.Expect))
		default:
			return fmt.Errorf("bench: peer: unknown command %q", cmd.Cmd)
		}
		if err != nil {
			return err
		}
	}
}

// finishPeer checks every migrated connection from the peer's side: on a
// static one, the peer writes its tail and reads everything the workload
// wrote (queued bytes and tail), verifying each byte; streams are paused
// and their checks collected.
func finishPeer(cfg *peerConfig, static, streams []*peerConn, expect map[connID]int64) *peerResult {
	res := &peerResult{event: event{Event: "done"}}
	var mu sync.Mutex
	fail := func(format string, args ...any) {
		mu.Lock()
		if len(res.Errors) < 10 {
			res.Errors = append(res.Errors, fmt.Sprintf(format, args...))
		}
		mu.Unlock()
	}
	var toPeer atomic.Int64
	pass := func(id connID) {
		mu.Lock()
		res.Verified = append(res.Verified, id)
		mu.Unlock()
	}
	deadline := time.Now().Add(finishTimeout)
	parallel(static, 64, func(pc *peerConn) error {
		n, ok := expect[pc.id]
		if !ok {
			fail("%s: the workload did not report this connection", pc.id)
			return nil
		}
		pc.c.SetDeadline(deadline)
		werr := make(chan error, 1)
		tail := patternBuf(dirToWorkload, pc.id.base()+int64(cfg.Queue), cfg.Tail)
		go func() { _, err := pc.c.Write(tail); werr <- err }()
		got := make([]byte, n)
		_, rerr := io.ReadFull(pc.c, got)
		if err := <-werr; err != nil {
			fail("%s: write tail: %v", pc.id, err)
			return nil
		}
		if rerr != nil {
			fail("%s: read %d bytes: %v", pc.id, n, rerr)
			return nil
		}
		if i := mismatch(got, patternBuf(dirToPeer, pc.id.base(), int(n))); i >= 0 {
			fail("%s: corrupt at offset %d", pc.id, i)
			return nil
		}
		toPeer.Add(n)
		pass(pc.id)
		return nil
	})
	var wg sync.WaitGroup
	for _, pc := range streams {
		wg.Add(1)
		go func() { defer wg.Done(); pc.ep.Pause() }()
	}
	wg.Wait()
	for _, pc := range streams {
		st := streamStat{ID: pc.id, MaxGap: pc.ep.MaxGap(), Acked: pc.acked.max, Received: pc.received.max,
			Resumed: pc.settleAcked && pc.settleReceived, Checked: pc.ep.Checked(), Sent: pc.ep.Sent()}
		res.Streams = append(res.Streams, st)
		switch {
		case pc.ep.Err() != nil:
			fail("stream %s: %v", pc.id, pc.ep.Err())
		case pc.ep.Checked() <= pc.id.base(): // offsets start at the stream's base
			fail("stream %s: received nothing", pc.id)
		default:
			toPeer.Add(pc.ep.Checked() - pc.id.base())
			pass(pc.id)
		}
	}
	res.ToPeer = toPeer.Load()
	res.VmHWM, _ = vmHWM()
	return res
}

// streamSampler reads tcpi_bytes_acked and tcpi_bytes_received of every
// streaming connection each millisecond.
type streamSampler struct {
	conns []*peerConn
	stop  chan struct{}
	done  chan struct{}

	mu      sync.Mutex // guards settled and the conns' settle flags
	settled time.Time  // when settle began; zero before
}

func startSampler(conns []*peerConn) *streamSampler {
	s := &streamSampler{conns: conns, stop: make(chan struct{}), done: make(chan struct{})}
	now := time.Now()
	for _, pc := range conns {
		a, r, _ := tcpBytes(pc.c)
		pc.acked.start(a, now)
		pc.received.start(r, now)
	}
	go s.run()
	return s
}

func (s *streamSampler) run() {
	defer close(s.done)
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			now := time.Now()
			for _, pc := range s.conns {
				pc.acked.stop(now)
				pc.received.stop(now)
			}
			return
		case <-t.C:
		}
		now := time.Now()
		s.mu.Lock()
		settling := !s.settled.IsZero()
		for _, pc := range s.conns {
			a, r, err := tcpBytes(pc.c)
			if err != nil {
				continue
			}
			if pc.acked.sample(a, now) && settling {
				pc.settleAcked = true
			}
			if pc.received.sample(r, now) && settling {
				pc.settleReceived = true
			}
		}
		s.mu.Unlock()
	}
}

// settle waits until every connection's counters have both moved since
// settle was called (or timeout), then stops sampling.
func (s *streamSampler) settle(timeout time.Duration) {
	s.mu.Lock()
	s.settled = time.Now()
	s.mu.Unlock()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		all := true
		for _, pc := range s.conns {
			all = all && pc.settleAcked && pc.settleReceived
		}
		s.mu.Unlock()
		if all {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(s.stop)
	<-s.done
}

// tcpBytes reads tcpi_bytes_acked and tcpi_bytes_received of c.
func tcpBytes(c *net.TCPConn) (acked, received uint64, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var info *unix.TCPInfo
	var serr error
	if err := rc.Control(func(fd uintptr) { info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil {
		return 0, 0, err
	}
	if serr != nil {
		return 0, 0, serr
	}
	return info.Bytes_acked, info.Bytes_received, nil
}

// dialMany opens n connections to addr, a few at a time. With small, each
// socket gets the smallest receive buffer before it connects.
func dialMany(addr string, n int, small bool) ([]*peerConn, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	if small {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 4096) }); err != nil {
				return err
			}
			return serr
		}
	}
	conns := make([]*peerConn, n)
	for i := range conns {
		conns[i] = &peerConn{}
	}
	err := parallel(conns, 8, func(pc *peerConn) error {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return fmt.Errorf("bench: peer: dial %s: %w", addr, err)
		}
		pc.c = c.(*net.TCPConn)
		pc.id = newConnID(pc.c.RemoteAddr().(*net.TCPAddr).Port, pc.c.LocalAddr().(*net.TCPAddr).Port)
		return nil
	})
	return conns, err
}

// parallel runs fn on the items with at most n at a time. After an error
// no new item is started; it returns the errors met.
func parallel[T any](items []T, n int, fn func(T) error) error {
	var next atomic.Int64
	var failed atomic.Bool
	var errs errList
	var wg sync.WaitGroup
	for range min(n, len(items)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !failed.Load() {
				i := int(next.Add(1)) - 1
				if i >= len(items) {
					return
				}
				if err := fn(items[i]); err != nil {
					errs.add(err)
					failed.Store(true)
				}
			}
		}()
	}
	wg.Wait()
	return errs.err()
}

// patternBuf returns n bytes of stream dir from offset off.
func patternBuf(dir byte, off int64, n int) []byte {
	b := make([]byte, n)
	streamcheck.Pattern(b, dir, off)
	return b
}

// mismatch returns the first offset where got and want differ, or -1.
func mismatch(got, want []byte) int {
	if bytes.Equal(got, want) {
		return -1
	}
	for i := range got {
		if got[i] != want[i] {
			return i
		}
	}
	return len(got)
}
