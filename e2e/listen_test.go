package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/activation"
	"github.com/tcpmigrate/tcpmigrate/internal/fdpass"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// The listener test's protocol, per connection: the peer sends a request
// of reqLen bytes (a pattern seeded by its connection number), reads the
// echo and checks it, then does it again. The old instance accepts only
// the first acceptFirst connections, echoes their first request and then
// stalls (it neither reads nor accepts any more), so the second requests,
// and every later connection, wait in the kernel: in receive queues and in
// the listener's accept queue.
const (
	reqLen      = 16 << 10
	acceptFirst = 4
)

// request returns the i-th request of connection n.
func request(n, i int) []byte {
	b := make([]byte, reqLen)
	r := rand.New(rand.NewPCG(uint64(n), uint64(i)))
	for j := range b {
		b[j] = byte(r.Uint32())
	}
	return b
}

// listenServer is the workload of the listener test, started as a helper
// (TCPM_E2E_HELPER=listen-server). Started plainly it listens on
// TCPM_ADDR and behaves as the old instance; started by `receive --exec`
// (LISTEN_FDS) it is the new instance: it serves every listener, pending
// connection and connection it inherits by echoing, and writes what it got
// to TCPM_REPORT.
func listenServer() int {
	files, err := activation.Files(true)
	if path := os.Getenv("TCPM_DELIVER"); path != "" && err == nil {
		files, err = adoptDelivered(path)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen-server:", err)
		return 1
	}
	echo := func(c net.Conn) { io.Copy(c, c) }
	if len(files) == 0 {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		ln, err := lc.Listen(context.Background(), "tcp", os.Getenv("TCPM_ADDR"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "listen-server:", err)
			return 1
		}
		fmt.Println("listening")
		for range acceptFirst {
			c, err := ln.Accept()
			if err != nil {
				return 1
			}
			go func() {
				buf := make([]byte, reqLen)
				if _, err := io.ReadFull(c, buf); err == nil {
					c.Write(buf)
				}
				// Stall: the next request stays in the kernel.
			}()
		}
		select {}
	}
	count := map[string]int{}
	for _, f := range files {
		kind, _, _ := strings.Cut(f.Name(), "-")
		count[kind]++
		switch {
		case strings.HasPrefix(kind, "listen"):
			ln, err := net.FileListener(f)
			if err != nil {
				fmt.Fprintln(os.Stderr, "listen-server:", err)
				return 1
			}
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					go echo(c)
				}
			}()
		case strings.HasPrefix(kind, "pending"):
			if _, _, _, err := activation.ParsePendingName(f.Name()); err != nil {
				fmt.Fprintln(os.Stderr, "listen-server:", err)
				return 1
			}
			fallthrough
		default:
			c, err := net.FileConn(f)
			if err != nil {
				fmt.Fprintln(os.Stderr, "listen-server:", err)
				return 1
			}
			go echo(c)
		}
		f.Close()
	}
	b, _ := json.Marshal(count)
	os.WriteFile(os.Getenv("TCPM_REPORT"), b, 0o644)
	select {}
}

// listenScene is the lab of the listener tests: the old instance on the
// source host, listening on the service address; the receiving agent on
// the target; and the peer, opening a connection every 20 ms, each doing
// two echoed exchanges and staying open until the end.
type listenScene struct {
	t                 *testing.T
	lan               *lab.LAN
	peer, src, dst    *lab.NS
	service           netip.Prefix
	bind              netip.AddrPort // the old instance's listening address
	addr              netip.AddrPort
	dir, self, report string
	tls               []string
	deliver           bool // the new instance takes the sockets from receive --deliver, not --exec
	old               *exec.Cmd
	watch             *watch
	before            map[string]int64 // the peer's Tcp counters before the move
	stop              chan struct{}
	wg                sync.WaitGroup
	closing           atomic.Bool
	opened, echoed    atomic.Int64 // dials that succeeded; first exchanges done
	done              atomic.Int64 // connections that completed both exchanges
	mu                sync.Mutex   // guards the fields below
	started           int
	conns             []net.Conn
	errs              map[string]error // first error, by the peer's address
	order             []string
}

// newListenScene builds the lab with the old instance listening on bind
// (the service address when invalid).
func newListenScene(t *testing.T, service netip.Prefix, bind netip.AddrPort) *listenScene {
	s := &listenScene{t: t, service: service, dir: t.TempDir(), addr: netip.AddrPortFrom(service.Addr(), svcPort),
		bind: bind, stop: make(chan struct{}), errs: map[string]error{}}
	if !s.bind.IsValid() {
		s.bind = s.addr
	}
	s.lan, s.peer, s.src, s.dst = lanHostsWith(t, service)
	cert, key, ca := certFiles(t)
	s.tls = []string{"--cert", cert, "--key", key, "--ca", ca}
	s.report = filepath.Join(s.dir, "report.json")
	var err error
	if s.self, err = os.Executable(); err != nil {
		t.Fatal(err)
	}
	s.old = s.src.Command(s.self)
	s.old.Env = append(os.Environ(), "TCPM_E2E_HELPER=listen-server", "TCPM_ADDR="+s.bind.String())
	s.old.Stderr = os.Stderr
	if err := s.old.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.old.Process.Kill(); s.old.Wait() })
	waitListening(t, s.src, svcPort)
	s.watch = startWatch(t, s.lan, s.peer, service.Addr().Is6())
	t.Cleanup(s.closeAll)
	return s
}

// receiver starts `receive --once --exec` of the new instance on the target.
func (s *listenScene) receiver(extra ...string) *exec.Cmd {
	args := append(append([]string{"receive", "--listen", "198.18.0.3:7946", "--claim-addr", s.service.String(),
		"--dev", "eth0", "--journal-dir", filepath.Join(s.dir, "jt")}, s.tls...), extra...)
	args = append(args, "--once")
	if s.deliver {
		// The new instance runs already and waits for the sockets.
		path := filepath.Join(s.dir, "deliver.sock")
		adopt := s.dst.Command(s.self)
		adopt.Env = append(os.Environ(), "TCPM_E2E_HELPER=listen-server", "TCPM_DELIVER="+path, "TCPM_REPORT="+s.report)
		adopt.Stderr = os.Stderr
		if err := adopt.Start(); err != nil {
			s.t.Fatal(err)
		}
		s.t.Cleanup(func() { adopt.Process.Kill(); adopt.Wait() })
		waitFile(s.t, path)
		args = append(args, "--deliver", "unix:"+path)
	} else {
		args = append(args, "--exec", "--", "env", "TCPM_E2E_HELPER=listen-server", "TCPM_REPORT="+s.report, s.self)
	}
	r := agent(s.t, s.dst, args...)
	waitListening(s.t, s.dst, 7946)
	return r
}

// sendCmd returns `send --pid` of the old instance, not started.
func (s *listenScene) sendCmd() *exec.Cmd {
	return s.src.Command(bin, append(append([]string{"send", "--to", "198.18.0.3:7946", "--pid", strconv.Itoa(s.old.Process.Pid),
		"--release-addr", s.service.String(), "--dev", "eth0", "--journal-dir", filepath.Join(s.dir, "js")}, s.tls...), "--json")...)
}

func (s *listenScene) fail(who string, err error) {
	if s.closing.Load() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.errs[who]; !ok {
		s.errs[who] = err
		s.order = append(s.order, who)
	}
}

// startPeer opens a connection every 20 ms until stopPeer; then it waits
// until the old instance has served its first connections and at least
// ten more wait in its accept queue, and reads the peer's counters.
func (s *listenScene) startPeer() {
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for n := 0; ; n++ {
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
			s.mu.Lock()
			s.started++
			s.mu.Unlock()
			s.wg.Add(1)
			go s.connection(n)
		}
	}()
	lab.WaitForWithin(s.t, 20*time.Second, fmt.Sprintf("%d connections echoed and %d opened before the move", acceptFirst, acceptFirst+10), func() (bool, string) {
		echoed, opened := s.echoed.Load(), s.opened.Load()
		return echoed >= acceptFirst && opened >= acceptFirst+10, fmt.Sprintf("%d echoed, %d opened", echoed, opened)
	})
	out, err := s.src.Exec(bin, "list", "--json", "--pid", strconv.Itoa(s.old.Process.Pid))
	s.t.Logf("list:\n%s", out)
	if err != nil {
		s.t.Fatal(err)
	}
	// list says what send --pid will do: recreate the listener, take the
	// queued connections from it, take the accepted ones.
	var rows []struct{ Moves, State string }
	if err := json.Unmarshal(out, &rows); err != nil {
		s.t.Fatalf("list --json: %v", err)
	}
	moves := map[string]int{}
	for _, r := range rows {
		moves[r.Moves]++
	}
	if moves["listener"] != 1 || moves["pending"] < 10 || moves["yes"] != acceptFirst {
		s.t.Errorf("list --pid: %v; want 1 listener, at least 10 pending, %d taken", moves, acceptFirst)
	}
	if s.before, err = s.peer.TCPCounters(); err != nil {
		s.t.Fatal(err)
	}
}

// connection is the peer's side of connection n.
func (s *listenScene) connection(n int) {
	defer s.wg.Done()
	var c net.Conn
	err := s.peer.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", s.addr.String(), 20*time.Second)
		return err
	})
	if err != nil {
		s.fail(fmt.Sprintf("dial %d", n), err)
		return
	}
	s.opened.Add(1)
	s.mu.Lock()
	s.conns = append(s.conns, c)
	s.mu.Unlock()
	who := c.LocalAddr().String()
	c.SetDeadline(time.Now().Add(40 * time.Second))
	for i := range 2 {
		req := request(n, i)
		if _, err := c.Write(req); err != nil {
			s.fail(who, fmt.Errorf("write %d: %w", i, err))
			return
		}
		got := make([]byte, reqLen)
		if _, err := io.ReadFull(c, got); err != nil {
			s.fail(who, fmt.Errorf("read echo %d: %w", i, err))
			return
		}
		if !bytes.Equal(got, req) {
			s.fail(who, fmt.Errorf("echo %d differs", i))
			return
		}
		if i == 0 {
			s.echoed.Add(1)
		}
	}
	s.done.Add(1)
}

// stopPeer stops opening connections and, with wait, waits for every
// connection to finish its exchanges.
func (s *listenScene) stopPeer(wait bool) {
	close(s.stop)
	if wait {
		s.wg.Wait()
	}
}

// closeAll closes the peer's connections; errors from then on are not
// recorded.
func (s *listenScene) closeAll() {
	s.closing.Store(true)
	s.mu.Lock()
	for _, c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// sendReport is the part of `send --json` the listener tests read.
type sendReport struct {
	Connections []struct {
		Remote    string `json:"remote"`
		Outcome   string `json:"outcome"`
		Error     string `json:"error"`
		PendingOn string `json:"pending_on"`
	} `json:"connections"`
	Listeners []struct {
		Local   string `json:"local"`
		Pending int    `json:"pending"`
		Outcome string `json:"outcome"`
		Error   string `json:"error"`
	} `json:"listeners"`
}

// TestCLIListenerUnderLoad moves a listener with a backlog of pending
// connections (handshake done, not accepted) under load, with `send --pid`
// and `receive --exec`: a peer opens a connection every 20 ms throughout.
// Every connection, whether served by the old instance, pending in its
// accept queue, or opened during or after the move (its SYN dropped by the
// listener lock and retransmitted), is echoed byte for byte, and the peer
// sees no failed connection attempt (its errors and its AttemptFails
// counter), no reset (its counters) and no RST or FIN on the bridge.
func TestCLIListenerUnderLoad(t *testing.T) {
	for _, tc := range []struct {
		name    string
		service netip.Prefix
		bind    netip.AddrPort
		receive []string
	}{
		{"ipv4", svc, netip.AddrPort{}, nil},
		{"ipv6", svc6, netip.AddrPort{}, nil},
		// A dual-stack listener on every address ([::]) with an IPv4 peer:
		// IPv4-mapped connections. A wildcard listener needs the target to
		// allow every address it takes: both families for a dual-stack one.
		{"dual-stack-wildcard", svc, netip.MustParseAddrPort("[::]:8080"), []string{"--allow", "::/0", "--allow", "0.0.0.0/0"}},
	} {
		t.Run(tc.name, func(t *testing.T) { testListenerUnderLoad(t, tc.service, tc.bind, tc.receive, false) })
	}
	// The same with the sockets handed to a running new instance over
	// receive --deliver (names in the delivery instead of LISTEN_FDNAMES).
	t.Run("ipv4-deliver", func(t *testing.T) { testListenerUnderLoad(t, svc, netip.AddrPort{}, nil, true) })
}

func testListenerUnderLoad(t *testing.T, service netip.Prefix, bind netip.AddrPort, receive []string, deliver bool) {
	s := newListenScene(t, service, bind)
	s.deliver = deliver
	receiver := s.receiver(receive...)
	s.startPeer()

	// The agent pauses before the switch, with the listener locked and
	// its queue taken: the peer's SYNs meanwhile must be dropped (the peer
	// retransmits them) and reach the new instance later.
	send := s.sendCmd()
	hang := filepath.Join(s.dir, "hang")
	send.Env = append(os.Environ(), "TCPMIGRATE_TEST_HANG=switch", "TCPMIGRATE_TEST_HANG_FILE="+hang, "TCPMIGRATE_TEST_HANG_MODE=pause")
	var sendOut, sendErr bytes.Buffer
	send.Stdout, send.Stderr = &sendOut, &sendErr
	if err := send.Start(); err != nil {
		t.Fatal(err)
	}
	lab.WaitForWithin(t, 20*time.Second, "send to reach the switch", func() (bool, string) {
		_, err := os.Stat(hang)
		return err == nil, fmt.Sprint(err)
	})
	retrans := synRetrans(t, s.peer)
	lab.WaitForWithin(t, 5*time.Second, "a SYN of the peer dropped while the listener is locked", func() (bool, string) {
		n := synRetrans(t, s.peer)
		return n > retrans, fmt.Sprintf("%d SYNs retransmitted since the lock", n-retrans)
	})
	os.Remove(hang)
	err := send.Wait()
	t.Logf("send:\n%s\n%s", sendOut.String(), sendErr.String())
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	var res sendReport
	if err := json.Unmarshal(sendOut.Bytes(), &res); err != nil {
		t.Fatal(err)
	}
	pending := 0
	for _, c := range res.Connections {
		if c.Outcome != "committed" {
			t.Errorf("connection %+v not committed", c)
		}
		if c.PendingOn != "" {
			pending++
		}
	}
	if len(res.Listeners) != 1 || res.Listeners[0].Outcome != "committed" || res.Listeners[0].Local != s.bind.String() ||
		res.Listeners[0].Pending != pending || pending < 10 || len(res.Connections) != acceptFirst+pending {
		t.Fatalf("send reported %d connections (%d pending) and listeners %+v; want %d served and at least 10 pending, one listener committed",
			len(res.Connections), pending, res.Listeners, acceptFirst)
	}
	if err := receiver.Wait(); err != nil {
		t.Fatalf("receive --once: %v", err)
	}

	// Keep opening connections for a while after the move, then let every
	// connection finish.
	time.Sleep(time.Second)
	s.stopPeer(true)
	s.mu.Lock()
	n := s.started
	for _, who := range s.order {
		t.Errorf("peer, %s: %v", who, s.errs[who])
	}
	s.mu.Unlock()
	if s.done.Load() != int64(n) {
		t.Errorf("%d of %d connections completed both exchanges", s.done.Load(), n)
	}
	after, err := s.peer.TCPCounters()
	if err != nil {
		t.Fatal(err)
	}
	if d := after["AttemptFails"] - s.before["AttemptFails"]; d != 0 {
		t.Errorf("the peer counted %d failed connection attempts", d)
	}
	t.Logf("%d connections: %d served by the old instance first, %d moved pending, the rest opened during and after the move; "+
		"the peer retransmitted %d SYNs", n, acceptFirst, pending, synRetrans(t, s.peer)-retrans)
	var got map[string]int
	if err := json.Unmarshal(read(s.report), &got); err != nil {
		t.Fatalf("new instance's report: %v", err)
	}
	fam := "4"
	if s.bind.Addr().Is6() {
		fam = "6"
	}
	if got["listen"+fam] != 1 || got["pending"+fam] != pending || got["tcp"+fam] != acceptFirst {
		t.Errorf("the new instance got %v; want 1 listener, %d pending, %d connections", got, pending, acceptFirst)
	}
	for _, ns := range []*lab.NS{s.src, s.dst} {
		if out, _ := ns.Exec("nft", "list", "tables"); bytes.Contains(out, []byte("tcpmigrate")) {
			t.Errorf("a lock table is left on %s:\n%s", ns.Label, out)
		}
	}
	s.watch.quiet(t)
}

// TestCLIListenerRollback refuses the listener on the target (its port is
// not allowed), so the migration rolls back. The connections the old
// instance had accepted go on there; those taken from its accept queue
// cannot go back into it and are reset, each reported failed by send; the
// peer sees exactly those resets (and nothing else fails: connections
// opened during and after the attempt complete their handshake with the
// old instance). docs/faults.md.
func TestCLIListenerRollback(t *testing.T) {
	s := newListenScene(t, svc, netip.AddrPort{})
	s.receiver("--allow-port", "1")
	s.startPeer()
	send := s.sendCmd()
	var sendOut, sendErr bytes.Buffer
	send.Stdout, send.Stderr = &sendOut, &sendErr
	err := send.Run()
	t.Logf("send:\n%s\n%s", sendOut.String(), sendErr.String())
	if code := send.ProcessState.ExitCode(); code != 1 {
		t.Fatalf("send: %v, want exit status 1", err)
	}
	var res sendReport
	if err := json.Unmarshal(sendOut.Bytes(), &res); err != nil {
		t.Fatal(err)
	}
	lost := map[string]bool{}
	for _, c := range res.Connections {
		switch {
		case c.PendingOn != "":
			lost[c.Remote] = true
			if c.Outcome != "failed" || !strings.Contains(c.Error, "reset") {
				t.Errorf("pending connection %+v: want failed, reset", c)
			}
		case c.Outcome != "rolled_back":
			t.Errorf("connection %+v: want rolled_back", c)
		}
	}
	if len(res.Listeners) != 1 || res.Listeners[0].Outcome != "rolled_back" || len(lost) < 10 {
		t.Fatalf("listeners %+v, %d pending connections: want the listener rolled back and at least 10 pending", res.Listeners, len(lost))
	}
	// The old instance is thawed with its listener: connections opened
	// meanwhile complete their handshake (it does not accept them).
	time.Sleep(1500 * time.Millisecond)
	s.stopPeer(false)
	lab.WaitFor(t, fmt.Sprintf("the %d reset connections to notice", len(lost)), func() (bool, string) {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.errs) >= len(lost), fmt.Sprintf("%d noticed: %v", len(s.errs), s.errs)
	})
	s.mu.Lock()
	for _, who := range s.order {
		if !lost[who] {
			t.Errorf("peer, %s: %v (not a connection taken from the queue)", who, s.errs[who])
		} else if !errors.Is(s.errs[who], syscall.ECONNRESET) {
			t.Errorf("peer, %s: %v, want a reset", who, s.errs[who])
		}
	}
	s.mu.Unlock()
	after, err := s.peer.TCPCounters()
	if err != nil {
		t.Fatal(err)
	}
	if d := after["EstabResets"] - s.before["EstabResets"]; d != int64(len(lost)) {
		t.Errorf("the peer counted %d resets, want %d (the connections taken from the queue)", d, len(lost))
	}
	if d := after["AttemptFails"] - s.before["AttemptFails"]; d != 0 {
		t.Errorf("the peer counted %d failed connection attempts", d)
	}
	s.watch.stop()
	s.closeAll()
	// The target let go of everything: no lock table, no listener.
	if out, _ := s.dst.Exec("nft", "list", "tables"); bytes.Contains(out, []byte("tcpmigrate")) {
		t.Errorf("a lock table is left on the target:\n%s", out)
	}
	if out, _ := s.dst.Exec("ss", "-Htln", fmt.Sprintf("sport = :%d", svcPort)); len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("the target still listens on the service port:\n%s", out)
	}
	if err := s.old.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("the old instance is gone after a rollback: %v", err)
	}
}

// synRetrans reads the peer's count of retransmitted SYNs (TcpExt
// TCPSynRetrans).
func synRetrans(t *testing.T, ns *lab.NS) int64 {
	t.Helper()
	m, err := ns.TCPExtCounters()
	if err != nil {
		t.Fatal(err)
	}
	n, ok := m["TCPSynRetrans"]
	if !ok {
		t.Fatal("no TcpExt TCPSynRetrans counter")
	}
	return n
}

// TestCLIListenerSourceKilled kills the source agent (SIGKILL) after it
// has locked the listener and taken its queue: at the end of the
// listeners phase (before the connections are inspected, locked or
// listed) and once the connections are in repair mode (verdicts).
// `tcpmigrate recover` then rolls back, leaves none of its lock tables
// and thaws the old instance, whose listener takes new connections again
// at once (a dial shorter than the peer's SYN retransmission succeeds).
// The connections taken from the queue died with the agent
// (docs/faults.md).
func TestCLIListenerSourceKilled(t *testing.T) {
	for _, step := range []string{"listeners", "verdicts"} {
		t.Run(step, func(t *testing.T) { testListenerSourceKilled(t, step) })
	}
}

func testListenerSourceKilled(t *testing.T, step string) {
	s := newListenScene(t, svc, netip.AddrPort{})
	s.receiver()
	s.startPeer()
	s.stopPeer(false)
	marker := filepath.Join(s.dir, "hung")
	send := s.sendCmd()
	send.Args = append(send.Args, "--lease", "30s")
	send.Env = append(os.Environ(), "TCPMIGRATE_TEST_HANG="+step, "TCPMIGRATE_TEST_HANG_FILE="+marker)
	var out bytes.Buffer
	send.Stdout, send.Stderr = &out, &out
	if err := send.Start(); err != nil {
		t.Fatal(err)
	}
	waitFile(t, marker)
	if tables, _ := s.src.Exec("nft", "list", "tables"); !bytes.Contains(tables, []byte("tcpmigrate_srcl-")) {
		t.Fatalf("no listener lock while the agent hangs:\n%s", tables)
	}
	send.Process.Kill()
	send.Wait()
	t.Logf("send (killed):\n%s", out.String())
	rec, err := s.src.Exec(bin, "recover", "--journal-dir", filepath.Join(s.dir, "js"))
	t.Logf("recover:\n%s", rec)
	if err != nil || !strings.Contains(string(rec), "rolled back") {
		t.Fatalf("recover: %v", err)
	}
	if tables, _ := s.src.Exec("nft", "list", "tables"); bytes.Contains(tables, []byte("tcpmigrate")) {
		t.Errorf("a lock table is left on the source after recover:\n%s", tables)
	}
	if st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.old.Process.Pid)); bytes.Contains(st, []byte(") T ")) {
		t.Error("the old instance is still stopped")
	}
	err = s.peer.Do(func() error {
		c, err := net.DialTimeout("tcp", s.addr.String(), 900*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err
	})
	if err != nil {
		t.Errorf("dial after recover: %v (is the listener still locked?)", err)
	}
	s.watch.stop()
}

// TestCLIListenerAlone moves a process that has a listener and no
// connection at all: the listener alone is a migration, and afterwards the
// peer's connections are served by the new instance.
func TestCLIListenerAlone(t *testing.T) {
	s := newListenScene(t, svc6, netip.AddrPort{})
	receiver := s.receiver()
	send := s.sendCmd()
	out, err := send.CombinedOutput()
	t.Logf("send:\n%s", out)
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	if err := receiver.Wait(); err != nil {
		t.Fatalf("receive --once: %v", err)
	}
	var got map[string]int
	lab.WaitFor(t, "the new instance's report", func() (bool, string) {
		err := json.Unmarshal(read(s.report), &got)
		return err == nil, fmt.Sprint(err)
	})
	if got["listen6"] != 1 || len(got) != 1 {
		t.Errorf("the new instance got %v; want one listener", got)
	}
	s.wg.Add(1)
	s.connection(0)
	for _, who := range s.order {
		t.Errorf("peer, %s: %v", who, s.errs[who])
	}
	if s.done.Load() != 1 {
		t.Error("the connection after the move was not served")
	}
	s.watch.quiet(t)
}

// adoptDelivered is the new instance's side of `receive --deliver`: it
// listens on path, takes the one delivery, acknowledges every socket and
// returns them as files named as the delivery named them.
func adoptDelivered(path string) ([]*os.File, error) {
	dl, err := fdpass.Listen(path, fdpass.Policy{})
	if err != nil {
		return nil, err
	}
	defer dl.Close()
	c, err := dl.Accept()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	items, err := c.RecvSockets()
	if err != nil {
		return nil, err
	}
	var files []*os.File
	var ids []uint64
	for _, it := range items {
		fd, err := syscall.Dup(int(it.File.Fd()))
		it.File.Close()
		if err != nil {
			return nil, err
		}
		files = append(files, os.NewFile(uintptr(fd), it.Name))
		ids = append(ids, it.ID)
	}
	return files, c.SendAck(ids)
}
