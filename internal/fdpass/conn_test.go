package fdpass

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"reflect"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHandoffConversation plays `send --handoff`: the application hands
// three sockets (IPv4, IPv6, IPv4-mapped) with state blobs to the agent,
// which proves each received descriptor is the very socket by talking to
// its peer, commits one and hands the other two back with new state; the
// application then talks to the peers through the sockets it got back.
func TestHandoffConversation(t *testing.T) {
	ns := newHost(t)
	pairs := []pair{
		makePairs(t, ns, 1, srv4, cli4)[0],
		makePairs(t, ns, 1, srv6, cli6)[0],
		makePairs(t, ns, 1, netip.IPv6Unspecified(), cli4)[0],
	}
	blob := make([]byte, DefaultMaxState)
	rand.Read(blob)
	items := []Item{
		item(t, pairs[0], 11, []byte("alpha")),
		item(t, pairs[1], 12, blob),
		item(t, pairs[2], 13, nil),
	}
	defer CloseItems(items)
	if !items[2].Local.Addr().Is4In6() {
		t.Fatalf("third socket is not IPv4-mapped: %v", items[2].Local)
	}

	ln := listenTemp(t, Policy{})
	app, agent := connect(t, ln, Limits{})
	for _, c := range []*Conn{app, agent} {
		if p := c.Peer(); p.PID != int32(os.Getpid()) || p.UID != uint32(os.Geteuid()) {
			t.Errorf("peer credentials %v, want this process", p)
		}
	}

	// A send blocks until the peer reads (the 1 MiB blob does not fit in
	// the socket buffer), so it runs beside the receive.
	sent := async(func() error { return app.SendSockets(items) })
	got, err := agent.RecvSockets()
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(items) {
		t.Fatalf("agent got %d sockets, want %d", len(got), len(items))
	}
	for i := range got {
		g, w := got[i], items[i]
		if g.ID != w.ID || g.Local != w.Local || g.Remote != w.Remote || !bytes.Equal(g.State, w.State) {
			t.Errorf("socket %d: got ID %d %v->%v %d state bytes, want ID %d %v->%v %d", i, g.ID, g.Local, g.Remote, len(g.State), w.ID, w.Local, w.Remote, len(w.State))
		}
		if l, r := sockAddrs(t, g.File); l != w.Local || r != w.Remote {
			t.Errorf("socket %d: received descriptor is %v->%v, metadata says %v->%v", i, l, r, w.Local, w.Remote)
		}
		if !isCloexec(t, g.File) {
			t.Errorf("socket %d: received descriptor is not close-on-exec", i)
		}
		exchange(t, g.File, pairs[i].peer, "agent")
	}

	if err := agent.SendCommitted([]uint64{11}); err != nil {
		t.Fatal(err)
	}
	back := []Item{got[1], got[2]}
	back[0].State = []byte("rolled back 12")
	back[1].State = []byte("rolled back 13")
	if err := agent.HandBack(back); err != nil {
		t.Fatal(err)
	}
	CloseItems(got) // the agent's copies

	m, err := app.Receive()
	if err != nil || m.Kind != KindCommitted || !reflect.DeepEqual(m.IDs, []uint64{11}) {
		t.Fatalf("app received %+v, %v; want committed [11]", m, err)
	}
	m, err = app.Receive()
	if err != nil || m.Kind != KindHandBack || len(m.Items) != 2 {
		t.Fatalf("app received %+v, %v; want a hand-back of 2", m, err)
	}
	defer CloseItems(m.Items)
	for i, it := range m.Items {
		if it.ID != back[i].ID || !bytes.Equal(it.State, back[i].State) || it.Local != back[i].Local {
			t.Errorf("handed back %d: ID %d state %q %v, want ID %d state %q %v", i, it.ID, it.State, it.Local, back[i].ID, back[i].State, back[i].Local)
		}
		exchange(t, it.File, pairs[i+1].peer, "app")
	}
}

// TestLiveHandoff plays `send --handoff` with an application that keeps
// serving: it hands 300 sockets over live (two frames, both flagged) and
// goes on talking to a peer through its own descriptor; the agent pauses
// two of them, the application answers for those, and a paused message
// or answer of the wrong kind is refused.
func TestLiveHandoff(t *testing.T) {
	ns := newHost(t)
	pairs := makePairs(t, ns, 300, srv4, cli4)
	items := make([]Item, len(pairs))
	for i, p := range pairs {
		items[i] = item(t, p, uint64(500+i), nil)
	}
	defer CloseItems(items)
	ln := listenTemp(t, Policy{})
	app, agent := connect(t, ln, Limits{MaxBatch: MaxBatchLimit})

	sent := async(func() error { return app.SendSocketsLive(items) })
	m, err := agent.Receive()
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer CloseItems(m.Items)
	if m.Kind != KindSockets || !m.Live || len(m.Items) != len(items) {
		t.Fatalf("agent got a %s message, live %v, of %d sockets; want a live sockets message of %d", m.Kind, m.Live, len(m.Items), len(items))
	}
	// The application still serves through its own copy.
	exchange(t, items[299].File, pairs[299].peer, "app")

	pause := []uint64{500, 799}
	type result struct {
		states [][]byte
		err    error
	}
	async2 := func(fn func() ([][]byte, error)) <-chan result {
		ch := make(chan result, 1)
		go func() { st, err := fn(); ch <- result{st, err} }()
		return ch
	}
	pauseAsync := func(timeout time.Duration) <-chan result {
		return async2(func() ([][]byte, error) { return agent.Pause(context.Background(), pause, timeout) })
	}
	done := pauseAsync(5 * time.Second)
	got, err := app.Receive()
	if err != nil || got.Kind != KindPause || !reflect.DeepEqual(got.IDs, pause) {
		t.Fatalf("app received %+v, %v; want pause %v", got, err, pause)
	}
	// Any order; a state each, as of the pause.
	if err := app.SendPaused([]Item{{ID: 799, State: []byte("at 799")}, {ID: 500}}); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.err != nil || len(r.states) != 2 || r.states[0] != nil || string(r.states[1]) != "at 799" {
		t.Fatalf("pause: states %q, %v; want [nil, \"at 799\"]", r.states, r.err)
	}
	// The agent's descriptors are the same sockets.
	exchange(t, m.Items[0].File, pairs[0].peer, "agent")

	// A paused record carries no descriptor.
	if err := app.SendPaused([]Item{{ID: 500, File: items[0].File}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("SendPaused with a File: %v, want ErrInvalid", err)
	}
	// An answer naming other sockets, or of another kind, fails the pause.
	done = pauseAsync(5 * time.Second)
	if _, err := app.Receive(); err != nil {
		t.Fatal(err)
	}
	if err := app.SendPaused([]Item{{ID: 500}}); err != nil {
		t.Fatal(err)
	}
	if r := <-done; !errors.Is(r.err, ErrUnexpected) {
		t.Fatalf("pause answered with other IDs: %v, want ErrUnexpected", r.err)
	}
	done = pauseAsync(5 * time.Second)
	if _, err := app.Receive(); err != nil {
		t.Fatal(err)
	}
	if err := app.SendAck(pause); err != nil {
		t.Fatal(err)
	}
	if r := <-done; !errors.Is(r.err, ErrUnexpected) {
		t.Fatalf("pause answered with an ack: %v, want ErrUnexpected", r.err)
	}
	// A pause of none answered with a record fails too.
	done = async2(func() ([][]byte, error) { return agent.Pause(context.Background(), nil, 5*time.Second) })
	if _, err := app.Receive(); err != nil {
		t.Fatal(err)
	}
	if err := app.SendPaused([]Item{{ID: 500}}); err != nil {
		t.Fatal(err)
	}
	if r := <-done; !errors.Is(r.err, ErrUnexpected) {
		t.Fatalf("pause of none answered with a record: %v, want ErrUnexpected", r.err)
	}
	// PauseItems pauses items by index and keeps their new states, for a
	// HAND-BACK after a rollback.
	done = async2(func() ([][]byte, error) {
		return agent.PauseItems(context.Background(), m.Items, []int{299, 0}, 5*time.Second)
	})
	if got, err := app.Receive(); err != nil || !reflect.DeepEqual(got.IDs, []uint64{799, 500}) {
		t.Fatalf("app received %+v, %v; want pause [799 500]", got, err)
	}
	if err := app.SendPaused([]Item{{ID: 500, State: []byte("s500")}, {ID: 799, State: []byte("s799")}}); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.err != nil || string(r.states[0]) != "s799" || string(r.states[1]) != "s500" ||
		string(m.Items[299].State) != "s799" || string(m.Items[0].State) != "s500" || m.Items[1].State != nil {
		t.Fatalf("PauseItems: states %q, %v; items' states %q %q %q", r.states, r.err, m.Items[0].State, m.Items[1].State, m.Items[299].State)
	}
	// A pause cancelled by its context ends at once, not at its timeout.
	cctx, ccancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer ccancel()
	begun := time.Now()
	if _, err := agent.Pause(cctx, pause, time.Minute); err == nil || time.Since(begun) > 10*time.Second {
		t.Fatalf("pause with a cancelled context: %v after %v, want an error within seconds", err, time.Since(begun))
	}
	if _, err := app.Receive(); err != nil { // the cancelled pause's PAUSE
		t.Fatal(err)
	}
	// A silent program: the pause gives up at its timeout.
	start := time.Now()
	if _, err := agent.Pause(context.Background(), pause, 100*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Fatalf("pause of a silent program: %v after %v, want a deadline error", err, time.Since(start))
	}
}

// async runs fn in a goroutine and delivers its result.
func async(fn func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- fn() }()
	return ch
}

// TestDeliverConversation plays `receive --deliver`: the application
// listens, the agent dials and passes sockets, the application
// acknowledges.
func TestDeliverConversation(t *testing.T) {
	ns := newHost(t)
	pairs := append(makePairs(t, ns, 1, srv6, cli6), makePairs(t, ns, 1, srv4, cli4)...)
	items := []Item{item(t, pairs[0], 1<<40|1, []byte("v6")), item(t, pairs[1], 1<<40|2, []byte("v4"))}
	appLn := listenTemp(t, Policy{})
	agent, app := connect(t, appLn, Limits{})

	if err := agent.SendSockets(items); err != nil {
		t.Fatal(err)
	}
	got, err := app.RecvSockets()
	if err != nil {
		t.Fatal(err)
	}
	defer CloseItems(got)
	ids := make([]uint64, len(got))
	for i, it := range got {
		ids[i] = it.ID
		if it.ID != items[i].ID || string(it.State) != string(items[i].State) || it.Remote != items[i].Remote {
			t.Errorf("socket %d: %+v", i, it)
		}
	}
	if err := app.SendAck(ids); err != nil {
		t.Fatal(err)
	}
	acked, err := agent.RecvAck()
	if err != nil || !reflect.DeepEqual(acked, []uint64{1<<40 | 1, 1<<40 | 2}) {
		t.Fatalf("agent got ack %v, %v", acked, err)
	}
	CloseItems(items) // the agent lets go after the ack
	for i := range got {
		exchange(t, got[i].File, pairs[i].peer, "app")
	}
}

// TestBatchOf300 passes 300 sockets in one message, which must be split:
// the kernel refuses more than 253 descriptors in one sendmsg.
func TestBatchOf300(t *testing.T) {
	ns := newHost(t)
	pairs := makePairs(t, ns, 300, srv4, cli4)
	items := make([]Item, len(pairs))
	for i, p := range pairs {
		items[i] = item(t, p, uint64(1000+i), []byte(fmt.Sprintf("state %d", i)))
	}
	defer CloseItems(items)

	// The limit the split is for.
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	fds := make([]int, MaxFDsPerFrame+1)
	for i := range fds {
		fds[i] = sp[1]
	}
	if err := unix.Sendmsg(sp[0], []byte{0}, unix.UnixRights(fds...), nil, 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("sendmsg of %d descriptors: %v, want EINVAL", len(fds), err)
	}
	unix.Close(sp[0])
	unix.Close(sp[1])

	ln := listenTemp(t, Policy{})
	app, agent := connect(t, ln, Limits{})
	sent := async(func() error { return app.SendSockets(items) })
	got, err := agent.RecvSockets()
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer CloseItems(got)
	if len(got) != 300 {
		t.Fatalf("got %d sockets", len(got))
	}
	for i, g := range got {
		if g.ID != items[i].ID || string(g.State) != fmt.Sprintf("state %d", i) {
			t.Fatalf("socket %d: ID %d state %q", i, g.ID, g.State)
		}
		if _, r := sockAddrs(t, g.File); r != items[i].Remote {
			t.Fatalf("socket %d: descriptor's peer is %v, metadata says %v", i, r, items[i].Remote)
		}
	}
	for _, i := range []int{0, 252, 253, 299} { // both sides of the frame boundary
		exchange(t, got[i].File, pairs[i].peer, "agent")
	}
}

// TestSendChecksPeerLimits: a message over the peer's announced limits is
// refused before a byte is written, and the connection stays usable.
func TestSendChecksPeerLimits(t *testing.T) {
	ns := newHost(t)
	p := makePairs(t, ns, 1, srv4, cli4)[0]
	it := item(t, p, 1, []byte("0123456789A"))
	defer it.File.Close()
	ln := listenTemp(t, Policy{Limits: Limits{MaxState: 10, MaxBatch: 2}})
	app, agent := connect(t, ln, Limits{})
	if got := app.PeerLimits(); got.MaxState != 10 || got.MaxBatch != 2 {
		t.Fatalf("peer limits %+v", got)
	}
	for _, c := range []struct {
		items []Item
		want  error
	}{
		{[]Item{it}, ErrTooLarge},
		{[]Item{{ID: 1, File: it.File}, {ID: 2, File: it.File}, {ID: 3, File: it.File}}, ErrTooLarge},
		{[]Item{{ID: 1, File: it.File}, {ID: 1, File: it.File}}, ErrInvalid},
		{[]Item{{ID: 1}}, ErrInvalid},
	} {
		if err := app.SendSockets(c.items); !errors.Is(err, c.want) {
			t.Errorf("send %d items: %v, want %v", len(c.items), err, c.want)
		}
	}
	if err := app.SendAck([]uint64{1, 2, 3}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("ack of 3 IDs: %v, want ErrTooLarge", err)
	}
	// Nothing was written: the agent times out with no byte read, which
	// leaves its connection usable.
	agent.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := agent.Receive(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("agent receive: %v, want a timeout", err)
	}
	agent.SetReadDeadline(time.Time{})
	it.State = it.State[:10]
	if err := app.SendSockets([]Item{it}); err != nil {
		t.Fatal(err)
	}
	got, err := agent.RecvSockets()
	if err != nil || len(got) != 1 || string(got[0].State) != "0123456789" {
		t.Fatalf("after the refusals: %+v, %v", got, err)
	}
	CloseItems(got)
}

// TestDialReadsAnyVersionError: a listener speaking another version can
// still say so, and Dial reports it clearly.
func TestDialReadsAnyVersionError(t *testing.T) {
	path := t.TempDir() + "/v9.sock"
	raw, err := listenRaw(path)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	done := make(chan error, 1)
	go func() {
		c, err := raw.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		b := appendError(nil, CodeVersion, "this side speaks version 9")
		b[4] = 9
		_, err = c.Write(b)
		done <- err
	}()
	_, err = Dial(t.Context(), path, Limits{})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var re *RemoteError
	if !errors.Is(err, ErrVersion) || !errors.As(err, &re) || re.Message != "this side speaks version 9" {
		t.Fatalf("dial: %v; want ErrVersion from the peer", err)
	}
	t.Log(err)
}

// TestDialHonoursContext: a listener that accepts but never says hello
// does not hang Dial beyond its context.
func TestDialHonoursContext(t *testing.T) {
	path := t.TempDir() + "/mute.sock"
	raw, err := listenRaw(path)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		if c, err := raw.Accept(); err == nil {
			defer c.Close()
			io.Copy(io.Discard, c) // until the dialer gives up and closes
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = Dial(ctx, path, Limits{})
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Fatalf("dial a mute listener: %v after %v; want the context's deadline", err, time.Since(start))
	}
	<-accepted
}
