package bench

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/fdpass"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
)

// wconn is one connection at the workload's end.
type wconn struct {
	c  *net.TCPConn
	id connID
	ep *streamcheck.Endpoint
	// written is what the workload wrote before the move (static ones).
	written int64
	// back says the workload holds the connection again after the move.
	back bool
	// live says the workload still serves the connection (a stream) after
	// handing it over live, until the source agent pauses it; kept, that
	// it paused it and still holds c, its own descriptor, until the
	// connection comes back (delivered by the target: c then goes; or
	// handed back by the source: c serves on).
	live, kept bool
}

// workload is the bench's application: it serves the peer's connections on
// the source host, hands them to the source agent and takes them back from
// the target agent.
type workload struct {
	o      *Options
	stream []*wconn // in hand-over order: streams first, then static ones
	static []*wconn
	calib  []*wconn
	byID   map[connID]*wconn

	// handed is closed once the workload has handed its sockets over and
	// closed its copies: only then are the wconns taken back.
	handed     chan struct{}
	handedOnce sync.Once

	mu sync.Mutex // guards back, handedBack, lastBack, pausedAt, pauseDone and each wconn's live and kept
	// back counts the sockets the workload holds again, delivered by the
	// target or handed back by the source (handedBack of them).
	back, handedBack int
	lastBack         time.Time
	allBack          chan struct{}
	// pausedAt is when the workload stopped serving the migrated sockets
	// (the source agent's pause, after a live hand-over), and pauseDone
	// when it had answered.
	pausedAt, pauseDone time.Time
}

// accept takes n connections on ln, a listener of the source host.
func accept(ln net.Listener, n int, deadline time.Time) ([]*wconn, error) {
	ln.(*net.TCPListener).SetDeadline(deadline)
	var out []*wconn
	for len(out) < n {
		c, err := ln.Accept()
		if err != nil {
			return out, fmt.Errorf("bench: accept %d of %d: %w", len(out), n, err)
		}
		tc := c.(*net.TCPConn)
		out = append(out, &wconn{c: tc, id: newConnID(tc.LocalAddr().(*net.TCPAddr).Port, tc.RemoteAddr().(*net.TCPAddr).Port)})
	}
	return out, nil
}

// fdOf returns c's descriptor; it stays owned by c.
func fdOf(c *net.TCPConn) int {
	fd := -1
	if rc, err := c.SyscallConn(); err == nil {
		rc.Control(func(u uintptr) { fd = int(u) })
	}
	return fd
}

// prime fills the queues of a static connection: it writes to the peer,
// which does not read and has a small receive window, until queue bytes
// wait unacknowledged or unsent in the send queue, and waits until the
// queue bytes the peer wrote are all in the receive queue, unread. The send
// buffer is set to twice the queue (the kernel doubles it again) so that a
// whole queue fits behind the closed window.
func (w *workload) prime(wc *wconn, pattern []byte, deadline time.Time) error {
	q := w.o.Queue
	fd := fdOf(wc.c)
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 2*q); err != nil {
		return fmt.Errorf("bench: SO_SNDBUF: %w", err)
	}
	// A queue that stops growing for this long will not fill: most likely
	// the kernel is under TCP memory pressure (tcp_mem), which this lab's
	// three hosts share.
	const stuck = 10 * time.Second
	progress := time.Now()
	for {
		outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
		if err != nil {
			return fmt.Errorf("bench: SIOCOUTQ: %w", err)
		}
		if outq >= q {
			break
		}
		if int(wc.written) >= len(pattern) {
			return fmt.Errorf("bench: %s: %d bytes written and only %d queued", wc.id, wc.written, outq)
		}
		n, err := unix.Write(fd, pattern[wc.written:min(len(pattern), int(wc.written)+q-outq)])
		if n > 0 {
			wc.written += int64(n)
			progress = time.Now()
		}
		if errors.Is(err, unix.EAGAIN) || err == nil && n == 0 {
			if time.Since(progress) > stuck || time.Now().After(deadline) {
				return fmt.Errorf("bench: %s: send queue stuck at %d of %d bytes; %s", wc.id, outq, q, tcpMem())
			}
			time.Sleep(time.Millisecond)
		} else if err != nil {
			return fmt.Errorf("bench: write: %w", err)
		}
	}
	last := -1
	for {
		inq, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
		if err != nil {
			return fmt.Errorf("bench: SIOCINQ: %w", err)
		}
		if inq >= q {
			return nil
		}
		if inq != last {
			last, progress = inq, time.Now()
		}
		if time.Since(progress) > stuck || time.Now().After(deadline) {
			return fmt.Errorf("bench: %s: receive queue stuck at %d of %d bytes; %s", wc.id, inq, q, tcpMem())
		}
		time.Sleep(time.Millisecond)
	}
}

// tcpMem describes the kernel's TCP memory: what is allocated (all
// namespaces together) against the tcp_mem thresholds, in pages.
func tcpMem() string {
	limits, _ := os.ReadFile("/proc/sys/net/ipv4/tcp_mem")
	stat, _ := os.ReadFile("/proc/net/sockstat")
	mem := "?"
	for _, line := range strings.Split(string(stat), "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == "TCP:" {
			for i := 1; i+1 < len(f); i += 2 {
				if f[i] == "mem" {
					mem = f[i+1]
				}
			}
		}
	}
	return fmt.Sprintf("TCP memory %s pages allocated, tcp_mem (min, pressure, max) %s", mem, strings.TrimSpace(string(limits)))
}

// serveDeliveries takes the sockets the target agent delivers.
func (w *workload) serveDeliveries(ln *fdpass.Listener, errs *errList) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return // the listener was closed
		}
		items, err := conn.RecvSockets()
		if err != nil {
			errs.add(err)
			conn.Close()
			continue
		}
		ids := w.takeBack(items, false, errs)
		errs.add(conn.SendAck(ids))
		conn.Close()
	}
}

// serveHandBacks takes the sockets the source agent hands back (their
// migration rolled back) on the hand-over connection, until it closes.
func (w *workload) serveHandBacks(conn *fdpass.Conn, errs *errList) {
	for {
		m, err := conn.Receive()
		if err != nil {
			return // the agent is done
		}
		switch m.Kind {
		case fdpass.KindHandBack:
			w.mu.Lock()
			w.handedBack += len(m.Items)
			w.mu.Unlock()
			w.takeBack(m.Items, true, errs)
		case fdpass.KindPause:
			w.pause(m.IDs, errs)
			paused := make([]fdpass.Item, len(m.IDs))
			for i, id := range m.IDs {
				paused[i].ID = id // the workload keeps its offsets itself
			}
			errs.add(conn.SendPaused(paused))
			w.mu.Lock()
			w.pauseDone = time.Now()
			w.mu.Unlock()
		}
	}
}

// pause stops serving the connections with these IDs, handed over live:
// their streams stop at exact offsets. The workload keeps its descriptors
// until each connection comes back, as a program must: if the hand-over
// connection failed now, they would be the sockets' only holders.
func (w *workload) pause(ids []uint64, errs *errList) {
	// The agent pauses in waves: the pause that stops a stream is the
	// workload's (the first names only static connections, which it does
	// not serve, when they are quiet and the streams are not).
	now := time.Now()
	var wg sync.WaitGroup
	for _, id := range ids {
		wc := w.byID[connID(id)]
		if wc == nil {
			errs.add(fmt.Errorf("bench: the source agent paused connection %d, which the workload never had", id))
			continue
		}
		w.mu.Lock()
		live := wc.live
		w.mu.Unlock()
		if !live {
			continue // a static connection: its descriptor went at the hand-over
		}
		w.mu.Lock()
		if w.pausedAt.IsZero() {
			w.pausedAt = now
		}
		w.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			wc.ep.Pause() // live: a stream
			w.mu.Lock()
			wc.live, wc.kept = false, true
			w.mu.Unlock()
		}()
	}
	wg.Wait()
	w.handedOver()
}

// takeBack puts the workload back in charge of items, delivered by the
// target or handed back by the source (fromSource): a stream carries on at
// once where it paused, a static connection waits for the final checks.
// It returns the items' IDs.
func (w *workload) takeBack(items []fdpass.Item, fromSource bool, errs *errList) []uint64 {
	<-w.handed
	ids := make([]uint64, 0, len(items))
	for _, it := range items {
		ids = append(ids, it.ID)
		// The target names a socket by its index in the migration, the
		// source by the workload's ID: the addresses say which it is.
		wc := w.byID[newConnID(int(it.Local.Port()), int(it.Remote.Port()))]
		if wc == nil {
			errs.add(fmt.Errorf("bench: got back an unknown connection %s -> %s", it.Local, it.Remote))
			it.File.Close()
			continue
		}
		w.mu.Lock()
		live, kept := wc.live, wc.kept
		wc.kept = false
		w.mu.Unlock()
		if live || kept && fromSource {
			// A second descriptor of the socket the workload holds: handed
			// back without a pause (served all along), or after one (the
			// stream carries on on the workload's own).
			it.File.Close()
			wc.back = true
			if kept { // a stream, paused
				wc.ep.Start(wc.c)
			}
			continue
		}
		if kept {
			// Delivered: the migration committed, and the workload's
			// descriptor is of the source's copy, in repair mode (closing
			// it sends nothing).
			wc.c.Close()
		}
		c, err := net.FileConn(it.File)
		it.File.Close()
		if err != nil {
			errs.add(fmt.Errorf("bench: socket taken back: %w", err))
			continue
		}
		wc.c, wc.back = c.(*net.TCPConn), true
		if wc.ep != nil {
			wc.ep.Start(wc.c)
		}
	}
	w.mu.Lock()
	w.back += len(items)
	w.lastBack = time.Now()
	if w.back >= len(w.byID) {
		close(w.allBack)
	}
	w.mu.Unlock()
	return ids
}

// finishStatic checks a static connection from the workload's side once it
// is back: it writes its tail and reads the peer's queued bytes and tail,
// verifying each.
func (w *workload) finishStatic(wc *wconn, tail, want []byte, deadline time.Time) error {
	if !wc.back {
		return fmt.Errorf("bench: %s never came back to the workload", wc.id)
	}
	wc.c.SetDeadline(deadline)
	werr := make(chan error, 1)
	go func() { _, err := wc.c.Write(tail); werr <- err }()
	got := make([]byte, len(want))
	_, rerr := io.ReadFull(wc.c, got)
	if err := <-werr; err != nil {
		return fmt.Errorf("bench: %s: write tail: %w", wc.id, err)
	}
	if rerr != nil {
		return fmt.Errorf("bench: %s: read %d bytes: %w", wc.id, len(want), rerr)
	}
	if i := mismatch(got, want); i >= 0 {
		return fmt.Errorf("bench: %s: corrupt at offset %d", wc.id, i)
	}
	return nil
}

// listen opens a listener on addr inside ns.
func listen(ns *lab.NS, addr string) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	return ln, err
}

// handedOver marks the hand-over done (or abandoned); it may be called more
// than once.
func (w *workload) handedOver() { w.handedOnce.Do(func() { close(w.handed) }) }
