package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/fdpass"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
)

// TestCLIHandoffDeliver runs the cooperating-program path with the real
// binary: the workload hands its live, streaming sockets to `send
// --handoff` with its per-connection state (the stream offsets); `receive
// --deliver` passes the restored sockets and that state to the workload's
// new instance, which carries on from the offsets it was given. The peers
// verify every byte and see no reset.
func TestCLIHandoffDeliver(t *testing.T) {
	w := newWorld(t, 8)
	hand, receiver, sender, delivered := w.handoffAgents(nil, nil)

	// The workload hands its sockets over, each with its offsets.
	hc := w.handOff(hand)
	defer hc.Close()
	w.expectCommitted(hc, delivered, receiver, sender)
}

// TestCLIHandoffDeliverWaves: a workload that hands its sockets over live
// to `send --pause-waves` is asked to pause its idle connections, then its
// streaming ones; with `receive --deliver-waves` its new instance gets the
// streaming connections, captured after the source's lock, in a delivery
// of their own, then the idle ones, pre-copied before it. Every byte
// arrives once, in order, with no reset, the idle streams carrying on once
// they are restarted at both ends.
func TestCLIHandoffDeliverWaves(t *testing.T) {
	w := newWorld(t, 8)
	idle, restart := w.quieten(4)
	hc, _, receiver, sender, delivered := w.liveHandOff([]string{"--deliver-waves"}, []string{"--pause-waves"})
	// The agent pauses the idle connections, then the streaming ones.
	w.answerPause(hc, w.expectMsg(hc, fdpass.KindPause, len(idle)).IDs)
	w.answerPause(hc, w.expectMsg(hc, fdpass.KindPause, len(w.conns)-len(idle)).IDs)
	w.awaitCommitted(hc, delivered, receiver, sender)
	w.expectDeliveries(idle, true)
	restart()
	w.check(500 * time.Millisecond)
}

// TestCLIHandoffLive runs the live hand-over with the real binary: the
// workload hands its streaming sockets to `send --handoff` and goes on
// serving them (reading, checking, writing) while the agent inspects them
// and prepares the target. When the agent pauses it, it stops each stream
// at an exact offset (keeping its descriptor until COMMITTED) and answers with those
// offsets as the socket's state, which `receive --deliver` passes to the
// workload's new instance. Every stream must have received bytes after
// the hand-over; the peers verify every byte and see no reset.
func TestCLIHandoffLive(t *testing.T) {
	w := newWorld(t, 8)
	hc, handed, receiver, sender, delivered := w.liveHandOff(nil, nil)
	m := w.expectMsg(hc, fdpass.KindPause, len(w.conns))
	for _, ep := range w.answerPause(hc, m.IDs) {
		if last := ep.LastReceived(); !last.After(handed) {
			t.Errorf("connection %s received nothing after the hand-over (last at %v, handed over at %v)", ep.Conn().RemoteAddr(), last, handed)
		}
	}
	w.expectCommitted(hc, delivered, receiver, sender)
}

// expectMsg receives the source's next message on hc, which must be of
// kind and name n connections (by ID, or as sockets).
func (w *world) expectMsg(hc *fdpass.Conn, kind fdpass.Kind, n int) fdpass.Message {
	t := w.t
	t.Helper()
	m, err := hc.Receive()
	if err != nil {
		t.Fatal(err)
	}
	if got := max(len(m.IDs), len(m.Items)); m.Kind != kind || got != n {
		t.Fatalf("the source sent a %s message naming %d connections, want a %s of %d", m.Kind, got, kind, n)
	}
	return m
}

// answerPause is the live workload's answer to a PAUSE of ids: it stops
// each of those streams at an exact offset and answers with the offsets as
// the sockets' states. It returns the paused endpoints.
func (w *world) answerPause(hc *fdpass.Conn, ids []uint64) []*streamcheck.Endpoint {
	t := w.t
	t.Helper()
	eps := make([]*streamcheck.Endpoint, len(ids))
	paused := make([]fdpass.Item, len(ids))
	for i, id := range ids {
		if id >= uint64(len(w.conns)) {
			t.Fatalf("the source paused connection %d, which the workload never handed over", id)
		}
		eps[i] = w.endpoint(w.conns[id].RemoteAddr().(*net.TCPAddr).AddrPort())
		eps[i].Pause()
		paused[i] = fdpass.Item{ID: id, State: eps[i].State()}
	}
	if err := hc.SendPaused(paused); err != nil {
		t.Fatal(err)
	}
	return eps
}

// expectCommitted waits for the commit (awaitCommitted) and checks the
// streams.
func (w *world) expectCommitted(hc *fdpass.Conn, delivered <-chan error, receiver, sender *exec.Cmd) {
	w.t.Helper()
	w.awaitCommitted(hc, delivered, receiver, sender)
	w.check(500 * time.Millisecond)
}

// awaitCommitted waits for the source's COMMITTED of every connection on
// hc, closes the workload's descriptors (of the source's copies, in repair
// mode: silent), and waits for the delivery and both agents.
func (w *world) awaitCommitted(hc *fdpass.Conn, delivered <-chan error, receiver, sender *exec.Cmd) {
	t := w.t
	t.Helper()
	w.expectMsg(hc, fdpass.KindCommitted, len(w.conns))
	for _, c := range w.conns {
		c.Close()
	}
	if err := <-delivered; err != nil {
		t.Fatal(err)
	}
	if err := receiver.Wait(); err != nil {
		t.Errorf("receive --once: %v", err)
	}
	if err := sender.Wait(); err != nil {
		t.Errorf("send: %v", err)
	}
}

// TestCLIHandoffLiveBadPause: a live workload that answers the pause for
// fewer sockets than asked, or with an error, has not let the agent lock
// anything: `send` rolls back and fails. After the short answer the sockets
// come back in a HAND-BACK (second descriptors of sockets the workload
// holds); after the error nothing can come back on the connection, and the
// workload carries on with the descriptors it kept. Either way the streams
// carry on, every byte verified, with no FIN and no reset.
func TestCLIHandoffLiveBadPause(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer func(hc *fdpass.Conn, ids []uint64) error
		back   bool // a HAND-BACK is expected
	}{
		{"too-few", func(hc *fdpass.Conn, ids []uint64) error { return hc.SendPaused([]fdpass.Item{{ID: ids[0]}}) }, true},
		{"error", func(hc *fdpass.Conn, _ []uint64) error {
			return hc.SendError(fmt.Errorf("%w: the workload will not pause", fdpass.ErrRejected))
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t, 4)
			hc, _, receiver, sender, _ := w.liveHandOff(nil, nil)
			m := w.expectMsg(hc, fdpass.KindPause, len(w.conns))
			// The workload pauses, then answers badly.
			for _, c := range w.conns {
				w.endpoint(c.RemoteAddr().(*net.TCPAddr).AddrPort()).Pause()
			}
			if err := tc.answer(hc, m.IDs); err != nil {
				t.Fatal(err)
			}
			if tc.back {
				m := w.expectMsg(hc, fdpass.KindHandBack, len(w.conns))
				fdpass.CloseItems(m.Items) // the workload kept its own
			}
			if err := sender.Wait(); err == nil {
				t.Error("send succeeded after a bad answer to its pause")
			}
			for _, c := range w.conns { // on the workload's own descriptors
				w.endpoint(c.RemoteAddr().(*net.TCPAddr).AddrPort()).Start(c)
			}
			receiver.Process.Kill()
			receiver.Wait()
			w.check(300 * time.Millisecond)
		})
	}
}

// TestCLIHandoffLiveRolledBack: the target refuses every connection (its
// only allowed port is not the service's), after the workload has paused
// them, closed its descriptors and answered with its offsets. The
// HAND-BACK must carry those offsets, not the state of the SOCKETS (none):
// a program that takes its sockets back carries on from the state it is
// handed, as the workload's new endpoints do here. Every byte is
// verified and no reset is seen.
func TestCLIHandoffLiveRolledBack(t *testing.T) {
	w := newWorld(t, 4)
	hc, _, receiver, sender, _ := w.liveHandOff([]string{"--allow-port", "1"}, nil)
	w.answerPause(hc, w.expectMsg(hc, fdpass.KindPause, len(w.conns)).IDs)
	m := w.expectMsg(hc, fdpass.KindHandBack, len(w.conns))
	for _, c := range w.conns {
		c.Close() // kept until now; the handed-back copies carry on
	}
	for _, it := range m.Items {
		conn, err := net.FileConn(it.File)
		it.File.Close()
		if err != nil {
			t.Fatal(err)
		}
		ep := streamcheck.NewEndpoint(1, 0)
		ep.Interval = time.Millisecond
		if err := ep.SetState(it.State); err != nil {
			t.Fatalf("socket %d handed back: %v", it.ID, err)
		}
		ep.Start(conn.(*net.TCPConn))
		w.mu.Lock()
		w.work[it.Remote.String()] = ep
		w.mu.Unlock()
	}
	sender.Wait()
	receiver.Process.Kill()
	receiver.Wait()
	w.check(300 * time.Millisecond)
}

// liveHandOff starts both agents (`send --handoff`, `receive --deliver`
// --once) and hands the workload's sockets over live: the workload keeps
// its descriptors and streams on. It returns the hand-over connection, the
// time of the hand-over, the agents, and the result of the workload's new
// instance adopting what the target delivers.
func (w *world) liveHandOff(recvArgs, sendArgs []string) (hc *fdpass.Conn, handed time.Time, receiver, sender *exec.Cmd, delivered <-chan error) {
	t := w.t
	t.Helper()
	hand, receiver, sender, delivered := w.handoffAgents(recvArgs, sendArgs)
	var err error
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if hc, err = fdpass.Dial(ctx, hand, fdpass.Limits{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hc.Close() })
	var items []fdpass.Item
	for i, c := range w.conns {
		f, err := c.File()
		if err != nil {
			t.Fatal(err)
		}
		items = append(items, fdpass.Item{File: f, Local: c.LocalAddr().(*net.TCPAddr).AddrPort(),
			Remote: c.RemoteAddr().(*net.TCPAddr).AddrPort(), ID: uint64(i)})
	}
	defer fdpass.CloseItems(items)
	if err := hc.SendSocketsLive(items); err != nil {
		t.Fatal(err)
	}
	return hc, time.Now(), receiver, sender, delivered
}

// handoffAgents starts `receive --deliver --once` on the target host (with
// recvArgs added), with the workload's new instance listening for the
// delivery (adopt), and `send --handoff` on the source host (with sendArgs
// added). It returns
// the hand-over socket's path once it is there, both agents, and the
// outcome of the adoption.
func (w *world) handoffAgents(recvArgs, sendArgs []string) (hand string, receiver, sender *exec.Cmd, delivered <-chan error) {
	t := w.t
	t.Helper()
	cert, key, ca := certFiles(t)
	dir := t.TempDir()
	deliver := filepath.Join(dir, "deliver.sock")
	hand = filepath.Join(dir, "handoff.sock")
	tls := []string{"--cert", cert, "--key", key, "--ca", ca}
	dl, err := fdpass.Listen(deliver, fdpass.Policy{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dl.Close() })
	adopted := make(chan error, 1)
	go func() { adopted <- w.adopt(dl) }()
	recv := append([]string{"receive", "--listen", "198.18.0.3:7946", "--claim-addr", svc.String(), "--dev", "eth0",
		"--once", "--journal-dir", filepath.Join(dir, "jt"), "--deliver", "unix:" + deliver}, append(tls, recvArgs...)...)
	receiver = agent(t, w.dst, recv...)
	waitListening(t, w.dst, 7946)
	send := append([]string{"send", "--to", "198.18.0.3:7946", "--handoff", "unix:" + hand,
		"--release-addr", svc.String(), "--dev", "eth0", "--journal-dir", filepath.Join(dir, "js")}, append(tls, sendArgs...)...)
	sender = agent(t, w.src, send...)
	waitFile(t, hand)
	return hand, receiver, sender, adopted
}

// adopt is the workload's new instance: it takes the delivered sockets, in
// as many deliveries as the target makes of them (recorded in
// w.deliveries), and carries on each stream from the offsets in its state.
func (w *world) adopt(dl *fdpass.Listener) error {
	for n := 0; n < len(w.conns); {
		got, err := w.adoptOne(dl)
		if err != nil {
			return err
		}
		n += got
	}
	return nil
}

// adoptOne takes one delivery and returns how many sockets it had.
func (w *world) adoptOne(dl *fdpass.Listener) (int, error) {
	c, err := dl.Accept()
	if err != nil {
		return 0, err
	}
	defer c.Close()
	items, err := c.RecvSockets()
	if err != nil {
		return 0, err
	}
	w.recordDelivery(len(items), func(i int) netip.AddrPort { return items[i].Remote })
	var ids []uint64
	for _, it := range items {
		conn, err := net.FileConn(it.File)
		it.File.Close()
		if err != nil {
			return 0, err
		}
		ep := streamcheck.NewEndpoint(1, 0)
		ep.Interval = time.Millisecond
		if err := ep.SetState(it.State); err != nil {
			conn.Close()
			return 0, err
		}
		ep.Start(conn.(*net.TCPConn))
		w.mu.Lock()
		w.work[it.Remote.String()] = ep
		w.mu.Unlock()
		ids = append(ids, it.ID)
	}
	return len(items), c.SendAck(ids)
}

func waitFile(t *testing.T, path string) {
	t.Helper()
	lab.WaitFor(t, path+" to appear", func() (bool, string) {
		_, err := os.Stat(path)
		return err == nil, fmt.Sprint(err)
	})
}

// handOff pauses the workload and hands its sockets to the source agent
// listening at path, each with its stream offsets as application state,
// and returns the handoff connection on which the agent answers.
func (w *world) handOff(path string) *fdpass.Conn {
	t := w.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hc, err := fdpass.Dial(ctx, path, fdpass.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	var items []fdpass.Item
	for i, c := range w.conns {
		ep := w.endpoint(c.RemoteAddr().(*net.TCPAddr).AddrPort())
		ep.Pause()
		f, err := c.File()
		if err != nil {
			t.Fatal(err)
		}
		items = append(items, fdpass.Item{File: f, Local: c.LocalAddr().(*net.TCPAddr).AddrPort(),
			Remote: c.RemoteAddr().(*net.TCPAddr).AddrPort(), State: ep.State(), ID: uint64(i)})
	}
	defer fdpass.CloseItems(items)
	if err := hc.SendSockets(items); err != nil {
		t.Fatal(err)
	}
	return hc
}
