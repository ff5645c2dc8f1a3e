package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/activation"
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

// TestCLIListenerUnderLoad moves a listener with a backlog of pending
// connections (handshake done, not accepted) under load, with `send --pid`
// and `receive --exec`: a peer opens a connection every 20 ms throughout.
// Every connection, whether served by the old instance, pending in its
// accept queue, or opened during or after the move (its SYN dropped by the
// listener lock and retransmitted), is echoed byte for byte, and the peer
// sees no failed connection attempt, no reset (its counters) and no RST
// or FIN on the bridge.
func TestCLIListenerUnderLoad(t *testing.T) {
	for _, tc := range []struct {
		name    string
		service netip.Prefix
	}{{"ipv4", svc}, {"ipv6", svc6}} {
		t.Run(tc.name, func(t *testing.T) { testListenerUnderLoad(t, tc.service) })
	}
}

func testListenerUnderLoad(t *testing.T, service netip.Prefix) {
	lan, peer, src, dst := lanHostsWith(t, service)
	dir := t.TempDir()
	cert, key, ca := certFiles(t)
	tls := []string{"--cert", cert, "--key", key, "--ca", ca}
	addr := netip.AddrPortFrom(service.Addr(), svcPort)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	old := src.Command(self)
	old.Env = append(os.Environ(), "TCPM_E2E_HELPER=listen-server", "TCPM_ADDR="+addr.String())
	old.Stderr = os.Stderr
	if err := old.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Process.Kill(); old.Wait() })
	waitListening(t, src, svcPort)
	report := filepath.Join(dir, "report.json")
	receiver := agent(t, dst, append(append([]string{"receive", "--listen", "198.18.0.3:7946", "--claim-addr", service.String(),
		"--dev", "eth0", "--journal-dir", filepath.Join(dir, "jt")}, tls...),
		"--once", "--exec", "--", "env", "TCPM_E2E_HELPER=listen-server", "TCPM_REPORT="+report, self)...)
	waitListening(t, dst, 7946)
	w := startWatch(t, lan, peer, service.Addr().Is6())

	// The peer: a new connection every 20 ms until stop, each doing its two
	// exchanges; the connections stay open until the end (no FIN on the
	// bridge before the judgement).
	var (
		mu       sync.Mutex
		conns    []net.Conn
		failures []string
		wg       sync.WaitGroup
		opened   atomic.Int64 // connections whose dial succeeded
		echoed   atomic.Int64 // first exchanges completed
		done     atomic.Int64 // connections that completed both exchanges
	)
	fail := func(format string, a ...any) {
		mu.Lock()
		failures = append(failures, fmt.Sprintf(format, a...))
		mu.Unlock()
	}
	stop := make(chan struct{})
	var started int
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for n := 0; ; n++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			mu.Lock()
			started++
			mu.Unlock()
			wg.Add(1)
			go func(n int) {
				defer wg.Done()
				var c net.Conn
				err := peer.Do(func() (err error) {
					c, err = net.DialTimeout("tcp", addr.String(), 20*time.Second)
					return err
				})
				if err != nil {
					fail("connection %d: dial: %v", n, err)
					return
				}
				opened.Add(1)
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
				c.SetDeadline(time.Now().Add(40 * time.Second))
				for i := range 2 {
					req := request(n, i)
					if _, err := c.Write(req); err != nil {
						fail("connection %d: write %d: %v", n, i, err)
						return
					}
					got := make([]byte, reqLen)
					if _, err := io.ReadFull(c, got); err != nil {
						fail("connection %d: read echo %d: %v", n, i, err)
						return
					}
					if !bytes.Equal(got, req) {
						fail("connection %d: echo %d differs", n, i)
						return
					}
					if i == 0 {
						echoed.Add(1)
					}
				}
				done.Add(1)
			}(n)
		}
	}()
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})

	// Before the move: the old instance served its first connections and
	// at least ten more wait in its accept queue.
	if err := waitFor(20*time.Second, func() bool { return echoed.Load() >= acceptFirst && opened.Load() >= acceptFirst+10 }); err != nil {
		t.Fatalf("before the move: %d echoed, %d opened", echoed.Load(), opened.Load())
	}
	out, _ := src.Exec(bin, "list", "--pid", strconv.Itoa(old.Process.Pid))
	t.Logf("list:\n%s", out)
	before, err := peer.TCPCounters()
	if err != nil {
		t.Fatal(err)
	}

	send := src.Command(bin, append(append([]string{"send", "--to", "198.18.0.3:7946", "--pid", strconv.Itoa(old.Process.Pid),
		"--release-addr", service.String(), "--dev", "eth0", "--journal-dir", filepath.Join(dir, "js")}, tls...), "--json")...)
	// The agent pauses before the switch, with the listener locked and
	// its queue taken: the peer's SYNs meanwhile must be dropped (the peer
	// retransmits them) and reach the new instance later.
	hang := filepath.Join(dir, "hang")
	send.Env = append(os.Environ(), "TCPMIGRATE_TEST_HANG=switch", "TCPMIGRATE_TEST_HANG_FILE="+hang, "TCPMIGRATE_TEST_HANG_MODE=pause")
	var sendOut, sendErr bytes.Buffer
	send.Stdout, send.Stderr = &sendOut, &sendErr
	if err := send.Start(); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(20*time.Second, func() bool { _, err := os.Stat(hang); return err == nil }); err != nil {
		t.Fatal("send never reached the switch")
	}
	retrans := synRetrans(t, peer)
	if err := waitFor(5*time.Second, func() bool { return synRetrans(t, peer) > retrans }); err != nil {
		t.Fatal("no SYN of the peer was dropped while the listener was locked")
	}
	os.Remove(hang)
	err = send.Wait()
	t.Logf("send:\n%s\n%s", sendOut.String(), sendErr.String())
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	var res struct {
		Connections []struct {
			Outcome   string `json:"outcome"`
			PendingOn string `json:"pending_on"`
		} `json:"connections"`
		Listeners []struct {
			Local   string `json:"local"`
			Pending int    `json:"pending"`
			Outcome string `json:"outcome"`
		} `json:"listeners"`
	}
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
	if len(res.Listeners) != 1 || res.Listeners[0].Outcome != "committed" || res.Listeners[0].Local != addr.String() ||
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
	close(stop)
	wg.Wait()
	mu.Lock()
	n := started
	for _, f := range failures {
		t.Error(f)
	}
	mu.Unlock()
	if done.Load() != int64(n) {
		t.Errorf("%d of %d connections completed both exchanges", done.Load(), n)
	}
	after, err := peer.TCPCounters()
	if err != nil {
		t.Fatal(err)
	}
	if d := after["AttemptFails"] - before["AttemptFails"]; d != 0 {
		t.Errorf("the peer counted %d failed connection attempts", d)
	}
	t.Logf("peer: %d SYNs retransmitted in all, %d connections opened during the run", synRetrans(t, peer)-retrans, after["ActiveOpens"]-before["ActiveOpens"])
	t.Logf("%d connections: %d served by the old instance first, %d moved pending, the rest opened during and after the move", n, acceptFirst, pending)
	var got map[string]int
	if err := json.Unmarshal(read(report), &got); err != nil {
		t.Fatalf("new instance's report: %v", err)
	}
	fam := "4"
	if service.Addr().Is6() {
		fam = "6"
	}
	if got["listen"+fam] != 1 || got["pending"+fam] != pending || got["tcp"+fam] != acceptFirst {
		t.Errorf("the new instance got %v; want 1 listener, %d pending, %d connections", got, pending, acceptFirst)
	}
	if out, _ := src.Exec("nft", "list", "tables"); bytes.Contains(out, []byte("tcpmigrate")) {
		t.Errorf("a lock table is left on the source:\n%s", out)
	}
	if out, _ := dst.Exec("nft", "list", "tables"); bytes.Contains(out, []byte("tcpmigrate")) {
		t.Errorf("a lock table is left on the target:\n%s", out)
	}
	w.quiet(t)
}

// synRetrans reads the peer's count of retransmitted SYNs (TcpExt
// TCPSynRetrans).
func synRetrans(t *testing.T, ns *lab.NS) int64 {
	t.Helper()
	var b []byte
	if err := ns.Do(func() (err error) {
		b, err = os.ReadFile("/proc/thread-self/net/netstat")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	for i := 0; i+1 < len(lines); i++ {
		names, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "TcpExt:" || len(vals) != len(names) {
			continue
		}
		for j, n := range names {
			if n == "TCPSynRetrans" {
				v, _ := strconv.ParseInt(vals[j], 10, 64)
				return v
			}
		}
	}
	t.Fatal("no TcpExt TCPSynRetrans counter")
	return 0
}
