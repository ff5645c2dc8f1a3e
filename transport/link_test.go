package transport

import (
	"context"
	"errors"
	"io"
	mrand "math/rand/v2"
	"net"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

func TestHandshake(t *testing.T) {
	forKinds(t, func(t *testing.T, k kind) {
		caps := repair.Capabilities{Features: repair.FeatRepair | repair.FeatRepairWindow, Kernel: "6.18.0",
			Congestion: []string{"cubic", "bbr"}}
		cl, sv := linkPair(t, k, func(c, s *Config) {
			c.Capabilities = caps
			c.Software = "source 1.0"
			s.Capabilities = repair.Capabilities{Features: repair.FeatRepair, Kernel: "6.1.0"}
			s.Require = repair.FeatRepair
			s.Limits.MaxConnections = 5000
		})
		if p := sv.Peer(); p.Features != caps.Features || p.Kernel != caps.Kernel ||
			!reflect.DeepEqual(p.Congestion, caps.Congestion) || p.Software != "source 1.0" {
			t.Errorf("server sees %+v", p)
		}
		if p := cl.Peer(); p.Kernel != "6.1.0" || p.Limits.MaxConnections != 5000 || p.Limits.MaxFrame != DefaultMaxFrame {
			t.Errorf("client sees %+v", p)
		}
		if cl.Version() != ProtocolVersion || sv.Version() != ProtocolVersion {
			t.Errorf("versions %d %d", cl.Version(), sv.Version())
		}
		if cl.Codec() != CodecZstd || sv.Codec() != CodecZstd {
			t.Errorf("codecs %s %s", cl.Codec(), sv.Codec())
		}
		_, clTLS := cl.TLSState()
		st, svTLS := sv.TLSState()
		if clTLS != (k == kindTLS) || svTLS != (k == kindTLS) {
			t.Errorf("TLS states %v %v on %s", clTLS, svTLS, k)
		}
		if k == kindTLS && (len(st.PeerCertificates) == 0 || st.PeerCertificates[0].Subject.CommonName != "source") {
			t.Errorf("server sees client certificates %v", st.PeerCertificates)
		}
		if cl.Err() != nil || sv.Err() != nil {
			t.Errorf("Err on a live link: %v %v", cl.Err(), sv.Err())
		}
	})
}

func TestUncompressedNegotiated(t *testing.T) {
	for _, side := range []string{"client", "server"} {
		t.Run(side, func(t *testing.T) {
			cl, sv := linkPair(t, kindTCP, func(c, s *Config) {
				if side == "client" {
					c.Compression = CompressNever
				} else {
					s.Compression = CompressNever
				}
			})
			if cl.Codec() != CodecNone || sv.Codec() != CodecNone {
				t.Fatalf("codecs %s %s, want none", cl.Codec(), sv.Codec())
			}
			roundTrip(t, cl, sv, 1, 100, 4<<10)
		})
	}
}

func TestControlRoundTrip(t *testing.T) {
	forKinds(t, func(t *testing.T, k kind) {
		cl, sv := linkPair(t, k, nil)
		ctx := context.Background()
		id := NewMigrationID()
		msgs := allMessages(id, []Verdict{{Index: 4, Code: VerdictOK}, {Index: 5, Code: VerdictFailed, Reason: "EADDRINUSE"}})
		var control []Message
		for _, m := range msgs {
			if msgTable[m.Type()].phase == phaseControl {
				control = append(control, m)
			}
		}
		// Both directions at once: each side sends everything and reads
		// everything.
		var wg sync.WaitGroup
		for _, l := range []*Link{cl, sv} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for _, m := range control {
					if err := l.Control().Send(ctx, m); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		for _, l := range []*Link{sv, cl} {
			for _, want := range control {
				got, err := l.Control().Recv(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("got %#v, want %#v", got, want)
				}
			}
		}
		wg.Wait()
		// All of them in one call: they arrive in order.
		if err := cl.Control().Send(ctx, control[0], control[1:]...); err != nil {
			t.Fatal(err)
		}
		for _, want := range control {
			got, err := sv.Control().Recv(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("sent together: got %#v, want %#v", got, want)
			}
		}
		// Messages that do not belong on the control stream are refused,
		// alone or with others.
		if err := cl.Control().Send(ctx, &Hello{}); !errors.Is(err, ErrUnexpected) {
			t.Errorf("sending a Hello: %v, want ErrUnexpected", err)
		}
		if err := cl.Control().Send(ctx, control[0], &Hello{}); !errors.Is(err, ErrUnexpected) {
			t.Errorf("sending a Hello after a control message: %v, want ErrUnexpected", err)
		}
	})
}

// roundTrip sends n snapshots with queues of up to qlen bytes over streams
// parallel streams and checks that each arrives whole.
func roundTrip(t *testing.T, cl, sv *Link, streams, n, qlen int) {
	t.Helper()
	rng := mrand.New(mrand.NewPCG(uint64(n), uint64(qlen)))
	snaps := make([]*repair.Snapshot, n)
	for i := range snaps {
		snaps[i] = randSnapshot(rng, rng.IntN(qlen+1), rng.IntN(qlen+1))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	errc := make(chan error, streams)
	for s := 0; s < streams; s++ {
		go func() {
			w, err := cl.OpenSnapshotStream(ctx)
			if err != nil {
				errc <- err
				return
			}
			for i := s; i < n; i += streams {
				if err := w.Write(uint32(i), snaps[i]); err != nil {
					w.Abort()
					errc <- err
					return
				}
			}
			errc <- w.Close()
		}()
	}
	got := make([]*repair.Snapshot, n)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for s := 0; s < streams; s++ {
		r, err := sv.AcceptSnapshotStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer r.Close()
			for {
				i, snap, err := r.Next()
				if err == io.EOF {
					return
				}
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				got[i] = snap
				mu.Unlock()
			}
		}()
	}
	for s := 0; s < streams; s++ {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	for i := range snaps {
		if !reflect.DeepEqual(got[i], snaps[i]) {
			t.Fatalf("snapshot %d differs after the round trip", i)
		}
	}
}

func TestSnapshotStreams(t *testing.T) {
	forKinds(t, func(t *testing.T, k kind) {
		cl, sv := linkPair(t, k, nil)
		roundTrip(t, cl, sv, 3, 300, 40<<10)
		// Streams go the other way too.
		roundTrip(t, sv, cl, 1, 10, 1000)
	})
}

func TestTenThousandConnections(t *testing.T) {
	cl, sv := linkPair(t, kindTLS, nil)
	roundTrip(t, cl, sv, 4, 10000, 300)
}

func TestMegabyteQueues(t *testing.T) {
	cl, sv := linkPair(t, kindTLS, nil)
	roundTrip(t, cl, sv, 2, 6, 4<<20)
}

// TestBigStreamDoesNotBlockSmallOnes: while a stream carrying megabytes is
// stalled (its reader does not read), ten thousand small snapshots on
// another stream go through.
func TestBigStreamDoesNotBlockSmallOnes(t *testing.T) {
	cl, sv := linkPair(t, kindTLS, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rng := mrand.New(mrand.NewPCG(7, 8))
	big := randSnapshot(rng, 8<<20, 8<<20)

	bigDone := make(chan error, 1)
	go func() {
		w, err := cl.OpenSnapshotStream(ctx)
		if err != nil {
			bigDone <- err
			return
		}
		if err := w.Write(100000, big); err != nil {
			w.Abort()
			bigDone <- err
			return
		}
		bigDone <- w.Close()
	}()
	bigR, err := sv.AcceptSnapshotStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer bigR.Close()
	// The big stream is now blocked on its flow-control window.
	roundTrip(t, cl, sv, 1, 10000, 100)
	select {
	case err := <-bigDone:
		t.Fatalf("the big stream finished before its reader read: %v", err)
	default:
	}
	i, got, err := bigR.Next()
	if err != nil || i != 100000 || !reflect.DeepEqual(got, big) {
		t.Fatalf("big snapshot: %d, %v", i, err)
	}
	if err := <-bigDone; err != nil {
		t.Fatal(err)
	}
	if _, _, err := bigR.Next(); err != io.EOF {
		t.Fatalf("after the big snapshot: %v, want EOF", err)
	}
}

func TestHandshakeOtherCA(t *testing.T) {
	ca, other := newCA(t, "our CA"), newCA(t, "another CA")
	cases := []struct {
		name             string
		client, server   *Config
		clientIs, servIs error
	}{
		{"client from another CA", tlsConfig(t, other, ca, "intruder"), tlsConfig(t, ca, ca, "target"), ErrAuth, ErrAuth},
		{"server from another CA", tlsConfig(t, ca, ca, "source"), tlsConfig(t, other, ca, "impostor"), ErrAuth, ErrTLS},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			start := time.Now()
			cl, sv, cerr, serr := handshakePair(t, kindTLS, c.client, c.server)
			if cl != nil || sv != nil {
				t.Fatal("a link was made")
			}
			if !errors.Is(cerr, c.clientIs) {
				t.Errorf("client: %v, want %v", cerr, c.clientIs)
			}
			if !errors.Is(serr, c.servIs) {
				t.Errorf("server: %v, want %v", serr, c.servIs)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("took %v", d)
			}
			t.Logf("client: %v\nserver: %v", cerr, serr)
		})
	}
}

func TestHandshakeNoClientCertificate(t *testing.T) {
	ca := newCA(t, "CA")
	ccfg := tlsConfig(t, ca, ca, "source")
	ccfg.TLS.Certificates = nil
	ccfg.TLS.GetClientCertificate = nil
	if _, err := ccfg.settings(); !errors.Is(err, ErrConfig) {
		t.Errorf("a TLS Config without certificate: %v, want ErrConfig", err)
	}
}

// TestPlaintextAgainstTLS: an insecure side and a TLS side each get a clear
// error naming the mismatch, promptly.
func TestPlaintextAgainstTLS(t *testing.T) {
	ca := newCA(t, "CA")
	cases := []struct {
		name           string
		client, server *Config
	}{
		{"plaintext client, TLS server", InsecureConfig(), tlsConfig(t, ca, ca, "target")},
		{"TLS client, plaintext server", tlsConfig(t, ca, ca, "source"), InsecureConfig()},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			start := time.Now()
			_, _, cerr, serr := handshakePair(t, kindTCP, c.client, c.server)
			cWant, sWant := ErrTLSPeer, ErrPlaintextPeer
			if c.client.Insecure == false {
				cWant, sWant = ErrPlaintextPeer, ErrTLSPeer
			}
			if !errors.Is(cerr, cWant) || !errors.Is(cerr, ErrHandshake) {
				t.Errorf("client: %v, want %v", cerr, cWant)
			}
			if !errors.Is(serr, sWant) {
				t.Errorf("server: %v, want %v", serr, sWant)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("took %v: a deadline, not a clear error", d)
			}
			t.Logf("client: %v\nserver: %v", cerr, serr)
		})
	}
}

func TestHandshakeMissingFeature(t *testing.T) {
	forKinds(t, func(t *testing.T, k kind) {
		for _, who := range []string{"server requires", "client requires"} {
			ccfg, scfg := configs(t, k)
			ccfg.Capabilities.Features = repair.FeatRepair
			scfg.Capabilities.Features = repair.FeatRepair
			if who == "server requires" {
				scfg.Require = repair.FeatRepairWindow
			} else {
				ccfg.Require = repair.FeatRepairWindow | repair.FeatRepair
			}
			_, _, cerr, serr := handshakePair(t, k, ccfg, scfg)
			for side, err := range map[string]error{"client": cerr, "server": serr} {
				var he *HandshakeError
				if !errors.Is(err, ErrMissingFeature) || !errors.As(err, &he) {
					t.Errorf("%s, %s: %v, want ErrMissingFeature", who, side, err)
				}
			}
			t.Logf("%s: client: %v\nserver: %v", who, cerr, serr)
		}
	})
}

// fakePeer runs f on the far end of a pipe, as a hand-written peer. The
// returned function waits for f to return.
func fakePeer(t *testing.T, f func(c net.Conn)) (net.Conn, func()) {
	a, b := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer b.Close()
		f(b)
	}()
	wait := func() { <-done }
	t.Cleanup(wait)
	return a, wait
}

func TestHandshakeVersionMismatch(t *testing.T) {
	future := []byte{'T', 'M', 'I', 'G', 0, 7, 0, 9}
	t.Run("server", func(t *testing.T) {
		var got Message
		conn, wait := fakePeer(t, func(c net.Conn) {
			_, _ = c.Write(appendFrame(append([]byte(nil), future...), &Hello{}))
			pre := make([]byte, preambleSize)
			if _, err := io.ReadFull(c, pre); err != nil {
				t.Error(err)
				return
			}
			_, _ = readHandshake(c) // the server's Hello
			got, _ = readHandshake(c)
		})
		_, err := Server(context.Background(), conn, InsecureConfig())
		if !errors.Is(err, ErrVersion) {
			t.Errorf("server: %v, want ErrVersion", err)
		}
		t.Log(err)
		wait()
		if r, ok := got.(*Reject); !ok || r.Code != RejectVersion {
			t.Errorf("the peer got %#v, want a version Reject", got)
		}
	})
	t.Run("client", func(t *testing.T) {
		var got Message
		conn, wait := fakePeer(t, func(c net.Conn) {
			pre := make([]byte, preambleSize)
			_, _ = io.ReadFull(c, pre)
			_, _ = readHandshake(c)
			b := appendFrame(append([]byte(nil), future...), &Hello{})
			_, _ = c.Write(appendFrame(b, &Accept{}))
			got, _ = readHandshake(c)
		})
		_, err := Client(context.Background(), conn, InsecureConfig())
		if !errors.Is(err, ErrVersion) {
			t.Errorf("client: %v, want ErrVersion", err)
		}
		wait()
		if r, ok := got.(*Reject); !ok || r.Code != RejectVersion {
			t.Errorf("the peer got %#v, want a version Reject", got)
		}
	})
}

func TestHandshakeBadMagic(t *testing.T) {
	for _, cfg := range []*Config{InsecureConfig(), tlsConfig(t, newCA(t, "CA"), newCA(t, "CA2"), "x")} {
		conn, _ := fakePeer(t, func(c net.Conn) {
			_, _ = c.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
		})
		_, err := Server(context.Background(), conn, cfg)
		if !errors.Is(err, ErrBadMagic) {
			t.Errorf("server, insecure=%v: %v, want ErrBadMagic", cfg.Insecure, err)
		}
	}
	conn, _ := fakePeer(t, func(c net.Conn) {
		_, _ = io.ReadFull(c, make([]byte, preambleSize))
		_, _ = readHandshake(c)
		_, _ = c.Write([]byte("SSH-2.0-OpenSSH_9.6\r\n"))
	})
	_, err := Client(context.Background(), conn, InsecureConfig())
	if !errors.Is(err, ErrBadMagic) {
		t.Errorf("client: %v, want ErrBadMagic", err)
	}
}

// TestHandshakeTimeout: a peer that says nothing, or stops halfway, makes
// the handshake fail at its deadline, not hang.
func TestHandshakeTimeout(t *testing.T) {
	for _, cfg := range []*Config{InsecureConfig(), tlsConfig(t, newCA(t, "CA"), newCA(t, "CA"), "x")} {
		release := make(chan struct{})
		conn, _ := fakePeer(t, func(c net.Conn) {
			<-release
		})
		cfg.HandshakeTimeout = 200 * time.Millisecond
		start := time.Now()
		_, err := Server(context.Background(), conn, cfg)
		close(release)
		var oe *OpError
		if !errors.Is(err, ErrTimeout) || !errors.As(err, &oe) || !oe.Timeout() {
			t.Errorf("silent peer: %v, want ErrTimeout", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("took %v", d)
		}
	}
	// A canceled context ends the handshake too.
	ctx, cancel := context.WithCancel(context.Background())
	release := make(chan struct{})
	conn, _ := fakePeer(t, func(c net.Conn) { <-release })
	time.AfterFunc(50*time.Millisecond, cancel)
	_, err := Client(ctx, conn, InsecureConfig())
	close(release)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("canceled: %v, want context.Canceled", err)
	}
}

func TestConfigErrors(t *testing.T) {
	if _, err := Listen("127.0.0.1:0", &Config{}); !errors.Is(err, ErrNoTLS) {
		t.Errorf("empty Config: %v, want ErrNoTLS", err)
	}
	if _, err := Dial(context.Background(), "127.0.0.1:1", nil); !errors.Is(err, ErrNoTLS) {
		t.Errorf("nil Config: %v, want ErrNoTLS", err)
	}
	ca := newCA(t, "CA")
	both := tlsConfig(t, ca, ca, "x")
	both.Insecure = true
	if _, err := Listen("127.0.0.1:0", both); !errors.Is(err, ErrConfig) {
		t.Errorf("TLS and Insecure: %v, want ErrConfig", err)
	}
	bad := InsecureConfig()
	bad.Compression = 9
	if _, err := Listen("127.0.0.1:0", bad); !errors.Is(err, ErrConfig) {
		t.Errorf("unknown compression: %v, want ErrConfig", err)
	}
	if _, err := LoadConfig("/nonexistent.crt", "/nonexistent.key", "/nonexistent.ca"); err == nil {
		t.Error("LoadConfig of missing files succeeded")
	}
}

// TestDialListen runs the public entry points with Configs loaded from PEM
// files.
func TestDialListen(t *testing.T) {
	ca := newCA(t, "CA")
	scfg, err := LoadConfig(writePEMs(t, ca, "target"))
	if err != nil {
		t.Fatal(err)
	}
	ccfg, err := LoadConfig(writePEMs(t, ca, "source"))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := Listen("127.0.0.1:0", scfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *Link, 1)
	go func() {
		for {
			l, err := ln.Accept()
			if errors.Is(err, net.ErrClosed) {
				close(accepted)
				return
			}
			if err != nil {
				t.Logf("accept: %v", err) // the refused intruder below
				continue
			}
			accepted <- l
		}
	}()
	// An intruder with a certificate from another CA is refused, and the
	// listener goes on.
	other := newCA(t, "other")
	if _, err := Dial(context.Background(), ln.Addr().String(), tlsConfig(t, other, ca, "intruder")); !errors.Is(err, ErrAuth) {
		t.Errorf("intruder: %v, want ErrAuth", err)
	}
	cl, err := Dial(context.Background(), ln.Addr().String(), ccfg)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	sv := <-accepted
	defer sv.Close()
	if err := cl.Control().Send(context.Background(), &Query{Migration: MigrationID{9}}); err != nil {
		t.Fatal(err)
	}
	m, err := sv.Control().Recv(context.Background())
	if err != nil || m.(*Query).Migration != (MigrationID{9}) {
		t.Fatalf("got %v, %v", m, err)
	}
	ln.Close()
	if _, ok := <-accepted; ok {
		t.Error("a second link was accepted")
	}
}

// TestControlRecvContext: a Recv canceled before any byte arrived leaves the
// stream usable.
func TestControlRecvContext(t *testing.T) {
	forKinds(t, func(t *testing.T, k kind) {
		cl, sv := linkPair(t, k, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		if _, err := sv.Control().Recv(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want DeadlineExceeded", err)
		}
		if err := cl.Control().Send(context.Background(), &Switched{Migration: MigrationID{1}}); err != nil {
			t.Fatal(err)
		}
		if m, err := sv.Control().Recv(context.Background()); err != nil || m.Type() != MsgSwitched {
			t.Fatalf("after a canceled Recv: %v, %v", m, err)
		}
		// The peer closing its control stream, after a message, is that
		// message, then io.EOF; the other direction still works.
		if err := cl.Control().Send(context.Background(), &Query{}); err != nil {
			t.Fatal(err)
		}
		if err := cl.Control().Close(); err != nil {
			t.Fatal(err)
		}
		if err := cl.Control().Send(context.Background(), &Query{}); !errors.Is(err, ErrClosed) {
			t.Fatalf("Send after Close: %v, want ErrClosed", err)
		}
		if m, err := sv.Control().Recv(context.Background()); err != nil || m.Type() != MsgQuery {
			t.Fatalf("before the close: %v, %v", m, err)
		}
		if _, err := sv.Control().Recv(context.Background()); !errors.Is(err, io.EOF) {
			t.Fatalf("after the peer closed: %v, want io.EOF", err)
		}
		if err := sv.Control().Send(context.Background(), &Outcome{State: StateUnknown}); err != nil {
			t.Fatal(err)
		}
		if m, err := cl.Control().Recv(context.Background()); err != nil || m.Type() != MsgOutcome {
			t.Fatalf("the other direction: %v, %v", m, err)
		}
	})
}

func TestControlFrameLimit(t *testing.T) {
	cl, sv := linkPair(t, kindTCP, func(c, s *Config) { s.Limits.MaxFrame = 1000 })
	vs := make([]Verdict, 500)
	for i := range vs {
		vs[i] = Verdict{Index: uint32(i), Code: VerdictOK}
	}
	err := cl.Control().Send(context.Background(), &Verdicts{Verdicts: vs})
	var le *LimitError
	if !errors.As(err, &le) || le.Max != 1000 {
		t.Fatalf("got %v, want a *LimitError of the peer's frame size", err)
	}
	// With a message that fits before it: nothing is sent either.
	err = cl.Control().Send(context.Background(), &Verdicts{Verdicts: vs[:1]}, &Verdicts{Verdicts: vs})
	if !errors.As(err, &le) || le.Max != 1000 {
		t.Fatalf("got %v, want a *LimitError of the peer's frame size", err)
	}
	// Nothing was sent; the stream goes on.
	if err := cl.Control().Send(context.Background(), &Verdicts{Verdicts: vs[:10]}); err != nil {
		t.Fatal(err)
	}
	if m, err := sv.Control().Recv(context.Background()); err != nil || len(m.(*Verdicts).Verdicts) != 10 {
		t.Fatalf("got %v, %v", m, err)
	}
	// A peer that ignores the limit is refused on receive.
	cl.peer.Limits.MaxFrame = 1 << 20
	if err := cl.Control().Send(context.Background(), &Verdicts{Verdicts: vs}); err != nil {
		t.Fatal(err)
	}
	_, err = sv.Control().Recv(context.Background())
	if !errors.As(err, &le) || le.Limit != "frame size" || le.Max != 1000 {
		t.Fatalf("got %v, want a *LimitError of the frame size", err)
	}
	if _, err := sv.Control().Recv(context.Background()); !errors.Is(err, ErrBroken) {
		t.Fatalf("after a limit error: %v, want ErrBroken", err)
	}
}
