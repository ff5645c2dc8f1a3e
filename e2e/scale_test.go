package e2e

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/activation"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/source"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// TestScale migrates 1, 100, 1,000 and 10,000 connections in one migration
// each, through the real target agent. Every connection carries a message
// from the peer that waits unread in its receive queue; on the target a new
// program started by `receive --exec` with all the sockets reads each
// message (proving it got that connection, intact) and answers, and the
// peer, a separate process, reads every answer. The peer counts no reset
// and the bridge sees no RST or FIN.
//
// The peer and the target's program are processes of their own because
// this machine caps a process at 20,000 descriptors.
func TestScale(t *testing.T) {
	for _, n := range []int{1, 100, 1000, 10000} {
		t.Run(strconv.Itoa(n), func(t *testing.T) { testScale(t, n) })
	}
}

func testScale(t *testing.T, n int) {
	lan, peer, src, dst := lanHosts(t)
	cert, key, ca := certFiles(t)
	dir := t.TempDir()
	tls := []string{"--cert", cert, "--key", key, "--ca", ca}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	recv := append([]string{"receive", "--listen", "198.18.0.3:7946", "--claim-addr", svc.String(), "--dev", "eth0",
		"--once", "--journal-dir", filepath.Join(dir, "jt")}, tls...)
	recv = append(recv, "--exec", "--", "env", "TCPM_E2E_HELPER=responder", self)
	receiver := agent(t, dst, recv...)
	waitListening(t, dst, 7946)

	var ln net.Listener
	if err := src.Do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(svc.Addr(), svcPort).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var mu sync.Mutex
	var handed []source.Conn
	acceptDone := make(chan error, 1)
	go func() {
		for range n {
			c, err := ln.Accept()
			if err != nil {
				acceptDone <- err
				return
			}
			f, err := c.(*net.TCPConn).File()
			c.Close() // the copy keeps the socket
			if err != nil {
				acceptDone <- err
				return
			}
			mu.Lock()
			handed = append(handed, source.Conn{File: f})
			mu.Unlock()
		}
		acceptDone <- nil
	}()

	// The peer: a process of its own in the peer host.
	pcmd := peer.Command(self)
	pcmd.Env = append(os.Environ(), "TCPM_E2E_HELPER=peer", "TCPM_N="+strconv.Itoa(n),
		"TCPM_ADDR="+netip.AddrPortFrom(svc.Addr(), svcPort).String())
	pin, _ := pcmd.StdinPipe()
	pout, _ := pcmd.StdoutPipe()
	pcmd.Stderr = os.Stderr
	if err := pcmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer pcmd.Process.Kill()
	lines := bufio.NewScanner(pout)
	expect := func(want string) {
		t.Helper()
		if !lines.Scan() || lines.Text() != want {
			t.Fatalf("peer said %q (%v), want %q", lines.Text(), lines.Err(), want)
		}
	}
	expect("ready")
	if err := <-acceptDone; err != nil {
		t.Fatal(err)
	}
	watch := startWatch(t, lan, peer, false)

	tc, err := transport.LoadConfig(cert, key, ca)
	if err != nil {
		t.Fatal(err)
	}
	if tc.Capabilities, err = repair.Probe(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	// The link is dialled from the source host, where the agent runs.
	var res *source.Result
	err = src.Do(func() (err error) {
		res, err = source.Migrate(ctx, source.Config{
			To: "198.18.0.3:7946", Transport: tc, NetNS: src.Handle(), JournalDir: filepath.Join(dir, "js"),
			Timeout:     60 * time.Second,
			SwitchAddrs: []netip.Prefix{svc},
			Switch:      func(context.Context) error { return src.DelAddr(svc) },
		}, handed)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	var maxFreeze time.Duration
	for _, c := range res.Conns {
		if c.Outcome != source.Committed {
			t.Fatalf("connection %d: %s: %v", c.Index, c.Outcome, c.Err)
		}
		maxFreeze = max(maxFreeze, c.Freeze)
	}
	var phases []string
	for _, p := range res.Phases {
		phases = append(phases, p.Name+" "+p.Duration.Round(time.Microsecond).String())
	}
	t.Logf("%d connections: longest freeze %s; %s", n, maxFreeze.Round(time.Microsecond), strings.Join(phases, ", "))
	if err := receiver.Wait(); err != nil {
		t.Fatalf("receive --once: %v", err)
	}
	fmt.Fprintln(pin, "check")
	expect("ok")
	defer pin.Close() // the peer closes its connections only after the capture

	watch.quiet(t)
}

// scalePeer is the peer process of TestScale: it opens TCPM_N connections
// to TCPM_ADDR, sends each its index, says "ready", and on "check" reads
// every answer and says "ok" (or what went wrong).
func scalePeer() int {
	n, _ := strconv.Atoi(os.Getenv("TCPM_N"))
	conns := make([]net.Conn, n)
	for i := range conns {
		c, err := net.Dial("tcp", os.Getenv("TCPM_ADDR"))
		if err != nil {
			fmt.Println("dial:", err)
			return 1
		}
		conns[i] = c
		if _, err := c.Write(binary.BigEndian.AppendUint64([]byte("hello-"), uint64(i))); err != nil {
			fmt.Println("write:", err)
			return 1
		}
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	if !in.Scan() {
		return 1
	}
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(60 * time.Second))
		got := make([]byte, 12)
		if _, err := io.ReadFull(c, got); err != nil {
			fmt.Printf("connection %d: %v\n", i, err)
			return 1
		}
		if string(got[:4]) != "ack-" || binary.BigEndian.Uint64(got[4:]) != uint64(i) {
			fmt.Printf("connection %d got %q\n", i, got)
			return 1
		}
	}
	fmt.Println("ok")
	in.Scan() // wait for the test to finish watching before closing
	return 0
}

// scaleResponder is the program `receive --exec` starts with the migrated
// sockets: it reads each connection's message and answers it.
func scaleResponder() int {
	files, err := activation.Files(true)
	if err != nil || len(files) == 0 {
		fmt.Fprintln(os.Stderr, "responder: no sockets:", err)
		return 1
	}
	var wg sync.WaitGroup
	for _, f := range files {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				return
			}
			defer c.Close()
			msg := make([]byte, 14)
			if _, err := io.ReadFull(c, msg); err != nil {
				return
			}
			c.Write(append([]byte("ack-"), msg[6:]...))
			// Linger until the peer has read the answer and closes.
			io.Copy(io.Discard, c)
		}()
	}
	wg.Wait()
	return 0
}
