package target_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/audit"
	"github.com/tcpmigrate/tcpmigrate/internal/certs"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/source"
	"github.com/tcpmigrate/tcpmigrate/target"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// hostilePolicy is the target's policy in these tests: the service address
// and port only, at most 1,000 connections of 1 MiB each, and short
// timeouts so that a source that never finishes is cut off quickly.
var hostilePolicy = target.Policy{
	AllowPorts:     []uint16{svcPort},
	MaxConnections: 1000,
	MaxQueueBytes:  1 << 20,
	MaxBytes:       16 << 20,
	PrepareTimeout: 3 * time.Second,
	CommitTimeout:  5 * time.Second,
}

// heapBound is how far the heap of the test process (the target and the
// hostile source together, garbage not yet collected included) may rise
// during a case that tries to make the target hold a lot: the bomb claims
// 1 GiB, the flood sends a million records (holding them would take
// hundreds of MiB).
const heapBound = 64 << 20

// hostileCase is one hostile source. It returns the migration it made up,
// if any, once every connection it opened is closed.
type hostileCase struct {
	name string
	run  func(t *testing.T, h *harness) *transport.MigrationID
}

// TestHostileSource runs one hostile source after another against one
// target agent restoring into a lab namespace. For each, the target must
// answer with a clear refusal, and afterwards hold no socket of a made-up
// connection and no lock table, have no goroutine left behind, and still
// answer a query on a new link; the memory-hungry cases must keep the heap
// within heapBound.
func TestHostileSource(t *testing.T) {
	h := newHarness(t, hostilePolicy)
	for _, c := range hostileCases {
		t.Run(c.name, func(t *testing.T) {
			ignore := goleak.IgnoreCurrent()
			id := c.run(t, h)
			h.assertClean(t, id)
			goleak.VerifyNone(t, ignore)
		})
	}
}

var hostileCases = []hostileCase{
	{"certificate without the source role", func(t *testing.T, h *harness) *transport.MigrationID {
		for _, cert := range []tls.Certificate{h.cert(certs.RoleTarget), h.roleless("webserver")} {
			leaf := cert.Leaf
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			l, err := transport.Dial(ctx, h.addr, h.sourceConfig(cert))
			cancel()
			if l != nil {
				l.Close()
			}
			var he *transport.HandshakeError
			if !errors.As(err, &he) || !he.Remote || he.Code != transport.RejectPolicy || !strings.Contains(he.Reason, "role source") {
				t.Fatalf("%s: dial = %v, want a Reject of code policy naming the source role", leaf.Subject, err)
			}
			t.Logf("refused: %s", he.Reason)
			rec := h.auditRecord(t, "the refused handshake of "+leaf.Subject.CommonName, func(r *audit.Record) bool {
				return r.Event == audit.EventHandshake && r.Peer.Subject == leaf.Subject.String()
			})
			if rec.Outcome != audit.OutcomeRefused || !strings.Contains(rec.Reason, "role source") || !strings.HasPrefix(rec.Peer.Addr, "127.0.0.1:") {
				t.Errorf("audit record %+v", rec)
			}
		}
		return nil
	}},
	{"oversized handshake frame", func(t *testing.T, h *harness) *transport.MigrationID {
		tc := h.dialTLS(t, h.srcCert)
		defer tc.Close()
		_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
		hello := append([]byte("TMIG"), 0, 1, 0, 1)
		hello = binary.BigEndian.AppendUint32(hello, 1<<30) // a Hello of 1 GiB
		hello = append(hello, 0x01, 1, 1, 1)
		if _, err := tc.Write(hello); err != nil {
			t.Fatal(err)
		}
		var pre [8]byte
		if _, err := io.ReadFull(tc, pre[:]); err != nil {
			t.Fatalf("no answer to an oversized hello: %v", err)
		}
		typ, body, err := readRawFrame(tc)
		fs, _ := parseFields(body)
		if err != nil || typ != 0x03 || transport.RejectCode(fieldUint(fs, 1)) != transport.RejectMalformed ||
			!strings.Contains(fieldString(fs, 2), "handshake frame size") {
			t.Fatalf("answer %#x %q (%v), want a Reject malformed naming the handshake frame size", typ, fieldString(fs, 2), err)
		}
		return nil
	}},
	{"oversized control frame", func(t *testing.T, h *harness) *transport.MigrationID {
		r := h.dialRaw(t)
		defer r.close()
		r.send(append(binary.BigEndian.AppendUint32(nil, 64<<20), 0x10, 1, 16)) // a Prepare of 64 MiB
		r.expectAbort(10*time.Second, transport.AbortPolicy, "frame size")
		return &r.id
	}},
	{"oversized snapshot record", func(t *testing.T, h *harness) *transport.MigrationID {
		r := h.dialRaw(t)
		defer r.close()
		r.prepare(1)
		st := r.stream(0)
		rec := append(binary.BigEndian.AppendUint32(nil, 128<<20), 0x20) // 128 MiB > MaxSnapshot
		if _, err := st.Write(rawChunk(rec, false)); err != nil {
			t.Fatal(err)
		}
		r.expectAbort(10*time.Second, transport.AbortPolicy, "snapshot size")
		return &r.id
	}},
	{"truncated snapshot stream", func(t *testing.T, h *harness) *transport.MigrationID {
		r := h.dialRaw(t)
		defer r.close()
		r.prepare(2)
		st := r.stream(0)
		rec := rawRecord(0, fakeSnapshot(netip.AddrPortFrom(hSvc.Addr(), svcPort), 4000))
		if _, err := st.Write(rawChunk(rec[:len(rec)/2], false)); err != nil {
			t.Fatal(err)
		}
		st.Close() // the stream ends in the middle of a record
		r.expectAbort(10*time.Second, transport.AbortError, "ended early")
		return &r.id
	}},
	{"connection cut in the TLS handshake", func(t *testing.T, h *harness) *transport.MigrationID {
		c, err := net.Dial("tcp", h.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01}) // a ClientHello that never comes
		c.Close()
		h.auditRecord(t, "the cut handshake", func(r *audit.Record) bool {
			return r.Event == audit.EventHandshake && r.Peer.Addr == c.LocalAddr().String() && r.Outcome == audit.OutcomeRefused
		})
		return nil
	}},
	{"contradictory snapshots", func(t *testing.T, h *harness) *transport.MigrationID {
		svc := netip.AddrPortFrom(hSvc.Addr(), svcPort)
		window := fakeSnapshot(svc, 4001)
		window.Window.SndWnd = window.Window.MaxWindow + 1 // snd_wnd beyond the largest window ever offered
		scale := fakeSnapshot(svc, 4002)
		scale.SndWScale, scale.Window.SndWnd, scale.Window.MaxWindow = 0, 100000, 100000 // more than 16 bits can say
		family := fakeSnapshot(svc, 4003)
		family.Family = 10 // AF_INET6 with IPv4 addresses
		state := fakeSnapshot(svc, 4004)
		state.State = repair.StateListen
		snaps := []*repair.Snapshot{window, scale, family, state}
		vs, id := h.migrateGo(t, snaps)
		for i, want := range []string{"max_window", "scale 0", "family", "LISTEN"} {
			if vs[i].Code != transport.VerdictInvalid || !strings.Contains(vs[i].Reason, want) {
				t.Errorf("connection %d: %s %q, want invalid saying %q", i, vs[i].Code, vs[i].Reason, want)
			}
		}
		return &id
	}},
	{"unsent beyond the send queue", func(t *testing.T, h *harness) *transport.MigrationID {
		r := h.dialRaw(t)
		defer r.close()
		r.prepare(1)
		s := fakeSnapshot(netip.AddrPortFrom(hSvc.Addr(), svcPort), 4005)
		s.Unsent = 100
		body := append(rawRecord(0, s), rawFrame(0x21, appendUint(nil, 1, 1))...)
		st := r.stream(0)
		if _, err := st.Write(rawChunk(body, false)); err != nil {
			t.Fatal(err)
		}
		st.Close()
		r.expectAbort(10*time.Second, transport.AbortError, "unsent 100")
		return &r.id
	}},
	{"valid-looking snapshots outside the allow-list", func(t *testing.T, h *harness) *transport.MigrationID {
		other := fakeSnapshot(netip.AddrPortFrom(hDst.Addr(), svcPort), 4006) // the target host's own address
		port := fakeSnapshot(netip.AddrPortFrom(hSvc.Addr(), 22), 4007)       // the service address, port 22
		vs, id := h.migrateGo(t, []*repair.Snapshot{other, port})
		for i, want := range []string{"198.18.0.3 is not in the allow-list", "port 22"} {
			if vs[i].Code != transport.VerdictRefused || !strings.Contains(vs[i].Reason, want) {
				t.Errorf("connection %d: %s %q, want refused saying %q", i, vs[i].Code, vs[i].Reason, want)
			}
		}
		rec := h.auditRecord(t, "the refused connections", func(r *audit.Record) bool { return r.Migration == id.String() })
		if rec.Outcome != audit.OutcomeAborted || rec.Verdicts["refused"] != 2 || len(rec.Refused) != 2 || rec.Connections != 2 ||
			rec.Peer.Subject != h.srcCert.Leaf.Subject.String() || rec.Locals != 2 {
			t.Errorf("audit record %+v", rec)
		}
		return &id
	}},
	{"endless snapshot stream", func(t *testing.T, h *harness) *transport.MigrationID {
		r := h.dialRaw(t)
		defer r.close()
		r.prepare(1)
		st := r.stream(0)
		// Ancillary frames, which a receiver skips: they count against no
		// limit, so only the prepare timeout ends them.
		frame := rawFrame(0x81, bytes.Repeat([]byte{0xee}, 8<<10))
		stop, done := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(done)
			tick := time.NewTicker(5 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				if _, err := st.Write(rawChunk(frame, false)); err != nil {
					return
				}
			}
		}()
		start := time.Now()
		var took time.Duration
		peak := heapPeak(func() {
			r.expectAbort(20*time.Second, transport.AbortTimeout, "not prepared within")
			took = time.Since(start)
		})
		close(stop)
		r.close()
		<-done
		if took < hostilePolicy.PrepareTimeout || took > hostilePolicy.PrepareTimeout+5*time.Second {
			t.Errorf("cut off after %s, want just after the prepare timeout of %s", took, hostilePolicy.PrepareTimeout)
		}
		t.Logf("the heap grew by %d MiB at most", peak>>20)
		if peak > heapBound {
			t.Errorf("the heap grew by %d MiB", peak>>20)
		}
		return &r.id
	}},
	{"decompression bomb", func(t *testing.T, h *harness) *transport.MigrationID {
		// The bomb is a real zstd frame: a small one decodes to zeros.
		small, err := zstd.NewReader(nil)
		if err != nil {
			t.Fatal(err)
		}
		out, err := small.DecodeAll(rleBomb(3), nil)
		small.Close()
		if err != nil || len(out) != 3*128<<10 || bytes.IndexFunc(out, func(r rune) bool { return r != 0 }) >= 0 {
			t.Fatalf("the bomb is not what it seems: %d bytes, %v", len(out), err)
		}
		bomb := rleBomb(8192) // 32 KiB on the wire, 1 GiB decoded
		r := h.dialRaw(t)
		defer r.close()
		r.prepare(1)
		peak := heapPeak(func() {
			st := r.stream(1)
			if _, err := st.Write(rawChunk(bomb, true)); err != nil {
				t.Fatal(err)
			}
			r.expectAbort(10*time.Second, transport.AbortPolicy, "decoded chunk size")
		})
		t.Logf("the heap grew by %d MiB at most", peak>>20)
		if peak > heapBound {
			t.Errorf("the heap grew by %d MiB", peak>>20)
		}
		return &r.id
	}},
	{"a million connections announced", func(t *testing.T, h *harness) *transport.MigrationID {
		r := h.dialRaw(t)
		defer r.close()
		peak := heapPeak(func() {
			r.prepare(1_000_000)
			r.expectAbort(10*time.Second, transport.AbortPolicy, "1000000 connections announced, the limit is 1000")
		})
		t.Logf("the heap grew by %d MiB at most", peak>>20)
		if peak > heapBound {
			t.Errorf("the heap grew by %d MiB", peak>>20)
		}
		rec := h.auditRecord(t, "the refused migration", func(r2 *audit.Record) bool { return r2.Migration == r.id.String() })
		if rec.Outcome != audit.OutcomeRefused || rec.Connections != 1_000_000 || !strings.Contains(rec.Reason, "limit is 1000") {
			t.Errorf("audit record %+v", rec)
		}
		return &r.id
	}},
	{"a million records streamed", func(t *testing.T, h *harness) *transport.MigrationID {
		r := h.dialRaw(t)
		defer r.close()
		r.prepare(1000)
		st := r.stream(0)
		done := make(chan int, 1)
		go func() {
			// Tiny valid-looking records outside the allow-list, as many
			// as the target will take, in full chunks.
			s := fakeSnapshot(netip.AddrPortFrom(hDst.Addr(), 22), 0)
			s.RecvQueue, s.SendQueue, s.Unsent = nil, nil, 0
			var chunk []byte
			sent := 0
			for i := range 1_000_000 {
				s.Remote = netip.AddrPortFrom(fake, uint16(1+i%60000))
				rec := rawRecord(uint32(i), s)
				if len(chunk)+len(rec) > 128<<10 {
					if _, err := st.Write(rawChunk(chunk, false)); err != nil {
						break
					}
					chunk = chunk[:0]
				}
				chunk = append(chunk, rec...)
				sent = i + 1
			}
			done <- sent
		}()
		var rep reply
		peak := heapPeak(func() { rep = r.await(20*time.Second, true) })
		if err := checkFlood(rep); err != nil {
			t.Fatal(err)
		}
		t.Logf("%d verdicts, prepared %v, abort %s %q", len(rep.verdicts), rep.prepared, rep.abortCode, rep.reason)
		r.close()
		t.Logf("the source got %d records written before the target stopped reading", <-done)
		t.Logf("the heap grew by %d MiB at most", peak>>20)
		if peak > heapBound {
			t.Errorf("the heap grew by %d MiB", peak>>20)
		}
		return &r.id
	}},
	{"too many snapshot streams", func(t *testing.T, h *harness) *transport.MigrationID {
		r := h.dialRaw(t)
		defer r.close()
		r.prepare(100)
		for range 17 {
			r.stream(0)
		}
		r.expectAbort(10*time.Second, transport.AbortPolicy, "more than 16 snapshot streams")
		return &r.id
	}},
	{"tuples announced in PREPARE: only the allowed ones locked, before READY", func(t *testing.T, h *harness) *transport.MigrationID {
		// A version-2 source lists the 4-tuples so that the target locks
		// them before the freeze. The target must lock only those its
		// policy allows (the service address and port here), and say READY
		// once they are locked.
		l := h.dial(t, h.srcCert)
		defer l.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		id := transport.NewMigrationID()
		allowed := transport.Tuple{Local: netip.AddrPortFrom(hSvc.Addr(), svcPort), Remote: netip.AddrPortFrom(fake, 7001)}
		other := transport.Tuple{Local: netip.AddrPortFrom(hDst.Addr(), svcPort), Remote: netip.AddrPortFrom(fake, 7002)}
		// A dual-stack socket's IPv4 client comes IPv4-mapped: the policy
		// and the lock see it as IPv4.
		mapped := transport.Tuple{Local: netip.AddrPortFrom(netip.AddrFrom16(hSvc.Addr().As16()), svcPort),
			Remote: netip.AddrPortFrom(netip.AddrFrom16(fake.As16()), 7003)}
		if err := l.Control().Send(ctx, &transport.Prepare{Migration: id, Count: 3, Tuples: []transport.Tuple{allowed, other, mapped}}); err != nil {
			t.Fatal(err)
		}
		m, err := l.Control().Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := m.(*transport.Ready); !ok {
			t.Fatalf("the target answered PREPARE with %s, want READY", m.Type())
		}
		tables, err := h.lockTables(&id)
		if err != nil || len(tables) != 1 {
			t.Fatalf("lock table: %q, %v", tables, err)
		}
		out, err := h.dst.Exec("nft", "list", "table", strings.Fields(tables[0])[1], strings.Fields(tables[0])[2])
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(out), "7001") || strings.Contains(string(out), "7002") || !strings.Contains(string(out), "7003") {
			t.Fatalf("the lock holds (want ports 7001 and 7003, not 7002):\n%s", out)
		}
		if err := l.Control().Send(ctx, &transport.Abort{Migration: id, Code: transport.AbortCanceled}); err != nil {
			t.Fatal(err)
		}
		return &id
	}},
	{"restored, then the link is cut; its ID used again", func(t *testing.T, h *harness) *transport.MigrationID {
		// A valid snapshot for the service address is restored: the
		// observers must see its socket and its lock table (or their
		// silence elsewhere would prove nothing), and both must go when
		// the source vanishes.
		l := h.dial(t, h.srcCert)
		id := transport.NewMigrationID()
		vs := h.prepareGo(t, l, id, []*repair.Snapshot{fakeSnapshot(netip.AddrPortFrom(hSvc.Addr(), svcPort), 5555)})
		if vs[0].Code != transport.VerdictOK {
			t.Fatalf("the valid connection was not restored: %s %q", vs[0].Code, vs[0].Reason)
		}
		socks, err := h.sockets()
		if err != nil || len(socks) != 1 || !strings.Contains(socks[0], "198.18.0.10:8080") {
			t.Fatalf("restored socket not seen: %q, %v", socks, err)
		}
		tables, err := h.lockTables(&id)
		if err != nil || len(tables) != 1 {
			t.Fatalf("lock table not seen: %q, %v", tables, err)
		}
		l.Close() // the source vanishes: no Abort
		h.assertClean(t, &id)
		if st := h.query(t, id); st != transport.StateAborted {
			t.Errorf("the target records the cut migration as %s", st)
		}
		// A source that tries the same ID again is refused, and the
		// recorded outcome stays.
		r := h.dialRaw(t)
		defer r.close()
		r.id = id
		r.prepare(1)
		r.expectAbort(10*time.Second, transport.AbortPolicy, "migration ID already used")
		if st := h.query(t, id); st != transport.StateAborted {
			t.Errorf("after the reuse, the target records the migration as %s", st)
		}
		return &id
	}},
}

// checkFlood checks the target's answer to a Prepare of 1,000 followed by
// more records than that, all outside the allow-list: either it refused
// all 1,000 and said Prepared (reading no further), or it saw a record
// beyond the link's limit of 1,000 first and aborted naming that limit.
// Either way nothing was restored.
func checkFlood(rep reply) error {
	for _, v := range rep.verdicts {
		if v.code != transport.VerdictRefused {
			return fmt.Errorf("connection %d: %s %q, want refused", v.index, v.code, v.reason)
		}
	}
	switch {
	case rep.prepared && len(rep.verdicts) == 1000:
		return nil
	case !rep.prepared && rep.abortCode == transport.AbortPolicy && strings.Contains(rep.reason, "connection index 1000 over the limit of 999"):
		return nil
	}
	return fmt.Errorf("prepared %v after %d verdicts, abort %s %q (%v): want 1,000 refusals and prepared, or an abort at the limit",
		rep.prepared, len(rep.verdicts), rep.abortCode, rep.reason, rep.err)
}

// prepareGo sends Prepare and the snapshots over l with the transport's Go
// API and returns the verdicts, by index, once Prepared has come.
func (h *harness) prepareGo(t *testing.T, l *transport.Link, id transport.MigrationID, snaps []*repair.Snapshot) []transport.Verdict {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := l.Control().Send(ctx, &transport.Prepare{Migration: id, Count: uint32(len(snaps))}); err != nil {
		t.Fatal(err)
	}
	w, err := l.OpenSnapshotStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, s := range snaps {
		if err := w.Write(uint32(i), s); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	vs := make([]transport.Verdict, len(snaps))
	for {
		m, err := l.Control().Recv(ctx)
		if err != nil {
			t.Fatalf("waiting for the verdicts: %v", err)
		}
		switch m := m.(type) {
		case *transport.Verdicts:
			for _, v := range m.Verdicts {
				vs[v.Index] = v
			}
		case *transport.Prepared:
			return vs
		case *transport.Ready: // the target's set-up is done (version 2)
		default:
			t.Fatalf("target sent %s while preparing", m.Type())
		}
	}
}

// migrateGo prepares snaps in a new migration, then aborts it as a source
// would after refusals, and returns the verdicts.
func (h *harness) migrateGo(t *testing.T, snaps []*repair.Snapshot) ([]transport.Verdict, transport.MigrationID) {
	t.Helper()
	l := h.dial(t, h.srcCert)
	defer l.Close()
	id := transport.NewMigrationID()
	vs := h.prepareGo(t, l, id, snaps)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := l.Control().Send(ctx, &transport.Abort{Migration: id, Code: transport.AbortPolicy, Reason: "refused"}); err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		t.Logf("connection %d: %s: %s", v.Index, v.Code, v.Reason)
	}
	return vs, id
}

// hostileBackground runs hostile sources against the server, over and
// over, each on its own connections: silent connections that never start
// TLS, a handshake left half-done, decompression bombs, floods of records,
// certificates without the source role, contradictory and oversized
// snapshots, and a snapshot stream that never sends its record. Every
// refusal they get is checked. It returns a function that stops them and
// waits for them.
func hostileBackground(t *testing.T, h *harness) (stop func()) {
	bg, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var silent []net.Conn
	for range 8 {
		c, err := net.Dial("tcp", h.addr)
		if err != nil {
			t.Fatal(err)
		}
		silent = append(silent, c)
	}
	rounds := map[string]int{}
	var mu sync.Mutex
	loop := func(name string, f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for bg.Err() == nil {
				// Paced: the attacks are many, not a CPU exhaustion of
				// this two-core test machine.
				time.Sleep(10 * time.Millisecond)
				if err := f(); err != nil {
					if bg.Err() == nil { // not stopped in the middle
						t.Errorf("%s: %v", name, err)
					}
					return
				}
				mu.Lock()
				rounds[name]++
				mu.Unlock()
			}
		}()
	}
	loop("half-done handshake", func() error {
		tc, err := tls.Dial("tcp", h.addr, &tls.Config{Certificates: []tls.Certificate{h.srcCert}, RootCAs: h.pool,
			ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13})
		if err != nil {
			return err
		}
		defer tc.Close()
		_ = tc.SetDeadline(time.Now().Add(500 * time.Millisecond))
		tc.Write([]byte("TMIG"))       // and nothing more
		_, _ = io.Copy(io.Discard, tc) // until the deadline; the server waits for the rest
		return nil
	})
	loop("decompression bomb", func() error {
		r, err := h.openRaw(h.srcCert)
		if err != nil {
			return err
		}
		defer r.close()
		if err := r.write(prepareFrame(r.id, 1)); err != nil {
			return err
		}
		st, err := r.openStream(1)
		if err != nil {
			return err
		}
		if _, err := st.Write(rawChunk(rleBomb(8192), true)); err != nil {
			return err
		}
		if rep := r.await(10*time.Second, false); rep.abortCode != transport.AbortPolicy || !strings.Contains(rep.reason, "decoded chunk size") {
			return fmt.Errorf("answered %s %q (%v)", rep.abortCode, rep.reason, rep.err)
		}
		return nil
	})
	loop("flood of records", func() error {
		r, err := h.openRaw(h.srcCert)
		if err != nil {
			return err
		}
		defer r.close()
		if err := r.write(prepareFrame(r.id, 1000)); err != nil {
			return err
		}
		st, err := r.openStream(0)
		if err != nil {
			return err
		}
		s := fakeSnapshot(netip.AddrPortFrom(hDst.Addr(), 22), 0)
		s.RecvQueue, s.SendQueue, s.Unsent = nil, nil, 0
		var chunk []byte
		for i := range 1500 {
			s.Remote = netip.AddrPortFrom(fake, uint16(1+i))
			chunk = append(chunk, rawRecord(uint32(i), s)...)
			if len(chunk) > 100<<10 || i == 1499 {
				if _, err := st.Write(rawChunk(chunk, false)); err != nil {
					break // the target stopped reading: expected
				}
				chunk = chunk[:0]
			}
		}
		return checkFlood(r.await(10*time.Second, true))
	})
	imposter := h.sourceConfig(h.cert(certs.RoleTarget))
	loop("certificate without the source role", func() error {
		ctx, cancel := context.WithTimeout(bg, 5*time.Second)
		defer cancel()
		l, err := transport.Dial(ctx, h.addr, imposter)
		if err == nil {
			l.Close()
			return errors.New("accepted")
		}
		var he *transport.HandshakeError
		if !errors.As(err, &he) || he.Code != transport.RejectPolicy {
			return fmt.Errorf("refused with %v, want a Reject of code policy", err)
		}
		return nil
	})
	loop("contradictory and oversized snapshots", func() error {
		ctx, cancel := context.WithTimeout(bg, 10*time.Second)
		defer cancel()
		l, err := transport.Dial(ctx, h.addr, h.sourceConfig(h.srcCert))
		if err != nil {
			return err
		}
		defer l.Close()
		id := transport.NewMigrationID()
		if err := l.Control().Send(ctx, &transport.Prepare{Migration: id, Count: 3}); err != nil {
			return err
		}
		w, err := l.OpenSnapshotStream(ctx)
		if err != nil {
			return err
		}
		bad := fakeSnapshot(netip.AddrPortFrom(hSvc.Addr(), svcPort), 6000)
		bad.Window.SndWnd = 1 << 30
		big := fakeSnapshot(netip.AddrPortFrom(hSvc.Addr(), svcPort), 6002)
		big.RecvQueue = make([]byte, 2<<20) // over MaxQueueBytes
		for i, s := range []*repair.Snapshot{bad, fakeSnapshot(netip.AddrPortFrom(hDst.Addr(), svcPort), 6001), big} {
			if err := w.Write(uint32(i), s); err != nil {
				return err
			}
		}
		if err := w.Close(); err != nil {
			return err
		}
		refused := 0
		for {
			m, err := l.Control().Recv(ctx)
			if err != nil {
				return err
			}
			switch m := m.(type) {
			case *transport.Verdicts:
				for _, v := range m.Verdicts {
					if v.OK() {
						return fmt.Errorf("hostile connection %d was restored", v.Index)
					}
					refused++
				}
			case *transport.Prepared:
				if refused != 3 || m.OK != 0 {
					return fmt.Errorf("prepared %d ok after %d refusals", m.OK, refused)
				}
				return l.Control().Send(ctx, &transport.Abort{Migration: id, Code: transport.AbortPolicy})
			case *transport.Ready: // the target's set-up is done (version 2)
			default:
				return fmt.Errorf("got %s", m.Type())
			}
		}
	})
	loop("stream that never sends its record", func() error {
		ctx, cancel := context.WithTimeout(bg, 20*time.Second)
		defer cancel()
		l, err := transport.Dial(ctx, h.addr, h.sourceConfig(h.srcCert))
		if err != nil {
			return err
		}
		defer l.Close()
		if err := l.Control().Send(ctx, &transport.Prepare{Migration: transport.NewMigrationID(), Count: 1}); err != nil {
			return err
		}
		w, err := l.OpenSnapshotStream(ctx)
		if err != nil {
			return err
		}
		defer w.Abort()
		m, err := l.Control().Recv(ctx)
		if _, ready := m.(*transport.Ready); ready && err == nil {
			m, err = l.Control().Recv(ctx) // the target's set-up is done (version 2)
		}
		if err != nil {
			return err
		}
		if a, ok := m.(*transport.Abort); !ok || a.Code != transport.AbortTimeout {
			return fmt.Errorf("got %v, want an Abort of code timeout", m)
		}
		return nil
	})
	names := []string{"half-done handshake", "decompression bomb", "flood of records", "certificate without the source role",
		"contradictory and oversized snapshots", "stream that never sends its record"}
	return func() {
		// Every attack must have been answered, and checked, at least once.
		deadline := time.Now().Add(20 * time.Second)
		for {
			mu.Lock()
			var missing []string
			for _, n := range names {
				if rounds[n] == 0 {
					missing = append(missing, n)
				}
			}
			mu.Unlock()
			if len(missing) == 0 || t.Failed() {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("attacks that never completed a round: %q", missing)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		cancel()
		for _, c := range silent {
			c.Close()
		}
		wg.Wait()
		mu.Lock()
		t.Logf("hostile rounds meanwhile: %v", rounds)
		mu.Unlock()
	}
}

// TestHonestMigrationBesideHostileSources migrates a real connection
// between two lab hosts with source.Migrate while hostile sources hammer
// the same target agent (hostileBackground), eight of them holding
// connections that never start TLS. The honest migration must commit
// quickly (the silent connections must not hold up its handshake), the
// connection must carry the bytes queued before the move and new ones in
// both directions after it with no reset, the hostile sources must all
// have been refused, its migration ID cannot be reused, and nothing may be
// left behind.
func TestHonestMigrationBesideHostileSources(t *testing.T) {
	h := newHarness(t, hostilePolicy)
	ignore := goleak.IgnoreCurrent()
	svc := netip.AddrPortFrom(hSvc.Addr(), svcPort)

	var ln net.Listener
	if err := h.src.Do(func() (err error) { ln, err = net.Listen("tcp", svc.String()); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var peerConn net.Conn
	if err := h.peer.Do(func() (err error) { peerConn, err = net.Dial("tcp", svc.String()); return err }); err != nil {
		t.Fatal(err)
	}
	defer peerConn.Close()
	srcConn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer srcConn.Close()
	resets, err := h.peer.Resets()
	if err != nil {
		t.Fatal(err)
	}
	// Bytes the application on the source has not read yet travel in the
	// receive queue.
	before := []byte("sent before the move\n")
	if _, err := peerConn.Write(before); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, func() error {
		raw, err := srcConn.(*net.TCPConn).SyscallConn()
		if err != nil {
			return err
		}
		var n int
		var ierr error
		if err := raw.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil {
			return err
		}
		if ierr != nil || n != len(before) {
			return fmt.Errorf("%d bytes queued at the source (%v)", n, ierr)
		}
		return nil
	})

	stop := hostileBackground(t, h)
	stopped := false
	defer func() {
		if !stopped {
			stop()
		}
	}()
	time.Sleep(300 * time.Millisecond) // let the hostile sources get going

	f, err := srcConn.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	srcTC := h.sourceConfig(h.srcCert)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	res, err := source.Migrate(ctx, source.Config{
		To: h.addr, Transport: srcTC, NetNS: h.src.Handle(),
		Lease: 5 * time.Second, Timeout: 10 * time.Second, JournalDir: t.TempDir(),
		Switch: func(context.Context) error { return h.src.DelAddr(hSvc) },
		Unswitch: func(context.Context) error {
			if err := h.src.AddAddr(hSvc); err != nil {
				return err
			}
			return h.peer.FlushNeigh(hSvc.Addr())
		},
	}, []source.Conn{{File: f, AppState: []byte("honest")}})
	took := time.Since(start)
	if err != nil {
		t.Fatalf("honest migration: %v", err)
	}
	if c := res.Conns[0]; c.Outcome != source.Committed {
		t.Fatalf("honest connection: %s: %v", c.Outcome, c.Err)
	}
	t.Logf("honest migration committed in %s beside the hostile sources", took)
	if took > 5*time.Second {
		t.Errorf("the honest migration took %s", took)
	}
	srcConn.Close() // its copy is in repair mode: silent

	var d *target.Delivered
	select {
	case d = <-h.delivered:
	case <-time.After(10 * time.Second):
		t.Fatal("nothing delivered")
	}
	if string(d.AppState) != "honest" || d.Local != svc {
		t.Errorf("delivered %s with state %q", d.Local, d.AppState)
	}
	dc, err := d.Conn()
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	_ = dc.SetDeadline(time.Now().Add(10 * time.Second))
	_ = peerConn.SetDeadline(time.Now().Add(10 * time.Second))
	after := []byte("sent after the move\n")
	if _, err := peerConn.Write(after); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(before)+len(after))
	if _, err := io.ReadFull(dc, got); err != nil || !bytes.Equal(got, append(append([]byte{}, before...), after...)) {
		t.Fatalf("the target read %q (%v)", got, err)
	}
	if _, err := dc.Write([]byte("pong\n")); err != nil {
		t.Fatal(err)
	}
	pong := make([]byte, 5)
	if _, err := io.ReadFull(peerConn, pong); err != nil || string(pong) != "pong\n" {
		t.Fatalf("the peer read %q (%v)", pong, err)
	}
	if n, err := h.peer.Resets(); err != nil || n != resets {
		t.Errorf("the peer counted %d resets (%v)", n-resets, err)
	}

	stop()
	stopped = true
	// The honest migration's ID cannot be used again, and stays committed.
	if st := h.query(t, res.Migration); st != transport.StateCommitted {
		t.Errorf("honest migration recorded as %s", st)
	}
	r := h.dialRaw(t)
	r.id = res.Migration
	r.prepare(1)
	r.expectAbort(10*time.Second, transport.AbortPolicy, "already used")
	r.close()
	if st := h.query(t, res.Migration); st != transport.StateCommitted {
		t.Errorf("after a reuse of its ID, the honest migration is recorded as %s", st)
	}
	rec := h.auditRecord(t, "the honest migration", func(r *audit.Record) bool {
		return r.Migration == res.Migration.String() && r.Outcome != audit.OutcomeRefused
	})
	if rec.Outcome != audit.OutcomeCommitted || rec.Delivered != 1 || rec.Peer.Subject != h.srcCert.Leaf.Subject.String() ||
		len(rec.Local) != 1 || rec.Local[0] != svc.String() {
		t.Errorf("audit record of the honest migration: %+v", rec)
	}
	dc.Close()
	peerConn.Close()
	h.assertClean(t, nil)
	goleak.VerifyNone(t, ignore)
}
