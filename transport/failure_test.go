package transport

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// blackhole is a TCP proxy that can stop forwarding in both directions
// while keeping both connections open: a peer host that died, or a
// partition, with no FIN and no RST.
type blackhole struct {
	ln     net.Listener
	target string
	frozen atomic.Bool
	mu     sync.Mutex // guards conns
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newBlackhole(t *testing.T, target string) *blackhole {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &blackhole{ln: ln, target: target}
	b.wg.Add(1)
	go b.serve()
	t.Cleanup(b.close)
	return b
}

func (b *blackhole) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", b.target)
		if err != nil {
			c.Close()
			continue
		}
		b.mu.Lock()
		b.conns = append(b.conns, c, u)
		b.mu.Unlock()
		b.wg.Add(2)
		go b.pump(c, u)
		go b.pump(u, c)
	}
}

// pump copies from src to dst until frozen, then swallows what src sends.
func (b *blackhole) pump(src, dst net.Conn) {
	defer b.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !b.frozen.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (b *blackhole) close() {
	b.ln.Close()
	b.mu.Lock()
	for _, c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// deadPeer links a client and a server through a blackhole, freezes it,
// and checks that both sides notice within bound, and that a blocked Recv
// returns an error matching ErrPeerLost.
func deadPeer(t *testing.T, k kind, interval, timeout, bound time.Duration) {
	ccfg, scfg := configs(t, k)
	for _, c := range []*Config{ccfg, scfg} {
		c.KeepAliveInterval, c.KeepAliveTimeout = interval, timeout
	}
	ln, err := Listen("127.0.0.1:0", scfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	bh := newBlackhole(t, ln.Addr().String())
	accepted := make(chan *Link, 1)
	go func() {
		l, err := ln.Accept()
		if err != nil {
			t.Error(err)
		}
		accepted <- l
	}()
	cl, err := Dial(context.Background(), bh.ln.Addr().String(), ccfg)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	sv := <-accepted
	if sv == nil {
		t.FailNow()
	}
	defer sv.Close()

	// The link works, and stays up across several keepalive intervals.
	if err := cl.Control().Send(context.Background(), &Switched{}); err != nil {
		t.Fatal(err)
	}
	if _, err := sv.Control().Recv(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-cl.Done():
		t.Fatalf("the link ended while the peer was alive: %v", cl.Err())
	case <-time.After(3 * interval):
	}

	recvErr := make(chan error, 1)
	go func() {
		_, err := cl.Control().Recv(context.Background())
		recvErr <- err
	}()
	start := time.Now()
	bh.frozen.Store(true)
	for name, l := range map[string]*Link{"client": cl, "server": sv} {
		select {
		case <-l.Done():
		case <-time.After(bound - time.Since(start)):
			t.Fatalf("%s: the dead peer was not noticed within %v", name, bound)
		}
		if !errors.Is(l.Err(), ErrPeerLost) {
			t.Errorf("%s: Err() = %v, want ErrPeerLost", name, l.Err())
		}
		t.Logf("%s noticed after %v: %v", name, time.Since(start).Round(time.Millisecond), l.Err())
	}
	select {
	case err := <-recvErr:
		if !errors.Is(err, ErrPeerLost) {
			t.Errorf("blocked Recv: %v, want ErrPeerLost", err)
		}
	case <-time.After(time.Second):
		t.Fatal("a blocked Recv did not return after the link ended")
	}
}

func TestDeadPeerNoticed(t *testing.T) {
	for _, k := range []kind{kindTCP, kindTLS} {
		t.Run(string(k), func(t *testing.T) {
			deadPeer(t, k, 200*time.Millisecond, time.Second, 3*time.Second)
		})
	}
}

// TestDeadPeerNoticedDefaults: with the default keepalive settings a dead
// peer is noticed within seconds.
func TestDeadPeerNoticedDefaults(t *testing.T) {
	if testing.Short() {
		t.Skip("takes about five seconds")
	}
	t.Parallel()
	deadPeer(t, kindTLS, 0, 0, DefaultKeepAliveInterval+DefaultKeepAliveTimeout+2*time.Second)
}

// TestPeerConnectionKilled: a reset of the peer's connection is noticed at
// once, and a blocked Recv returns.
func TestPeerConnectionKilled(t *testing.T) {
	for _, k := range []kind{kindTCP, kindTLS} {
		t.Run(string(k), func(t *testing.T) {
			ccfg, scfg := configs(t, k)
			cc, sc := connPair(t, k)
			var (
				sv   *Link
				serr error
				wg   sync.WaitGroup
			)
			wg.Add(1)
			go func() {
				defer wg.Done()
				sv, serr = Server(context.Background(), sc, scfg)
			}()
			cl, err := Client(context.Background(), cc, ccfg)
			wg.Wait()
			if err != nil || serr != nil {
				t.Fatal(err, serr)
			}
			defer cl.Close()
			defer sv.Close()
			recvErr := make(chan error, 1)
			go func() {
				_, err := sv.Control().Recv(context.Background())
				recvErr <- err
			}()
			start := time.Now()
			_ = cc.(*net.TCPConn).SetLinger(0) // close with a RST
			cc.Close()
			select {
			case err := <-recvErr:
				if !errors.Is(err, ErrPeerLost) {
					t.Errorf("Recv: %v, want ErrPeerLost", err)
				}
				t.Logf("noticed after %v: %v", time.Since(start).Round(time.Millisecond), err)
			case <-time.After(time.Second):
				t.Fatal("a killed peer connection was not noticed within a second")
			}
			<-sv.Done()
		})
	}
}

// TestLinkClose: Close ends blocked calls on both sides, with ErrClosed on
// this side and ErrPeerLost on the other.
func TestLinkClose(t *testing.T) {
	forKinds(t, func(t *testing.T, k kind) {
		cl, sv := linkPair(t, k, nil)
		ctx := context.Background()
		accErr := make(chan error, 1)
		go func() {
			_, err := sv.AcceptSnapshotStream(ctx)
			accErr <- err
		}()
		recvErr := make(chan error, 1)
		go func() {
			_, err := cl.Control().Recv(ctx)
			recvErr <- err
		}()
		// Whether or not both calls are blocked yet, the outcome is the same.
		cl.Close()
		if err := <-recvErr; !errors.Is(err, ErrClosed) {
			t.Errorf("this side's Recv: %v, want ErrClosed", err)
		}
		if err := <-accErr; !errors.Is(err, ErrPeerLost) {
			t.Errorf("peer's Accept: %v, want ErrPeerLost", err)
		}
		if _, err := cl.OpenSnapshotStream(ctx); !errors.Is(err, ErrClosed) {
			t.Errorf("open after Close: %v, want ErrClosed", err)
		}
		if err := cl.Control().Send(ctx, &Query{}); !errors.Is(err, ErrClosed) {
			t.Errorf("send after Close: %v, want ErrClosed", err)
		}
	})
}
