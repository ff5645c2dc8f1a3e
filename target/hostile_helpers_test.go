package target_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/tcpmigrate/tcpmigrate/internal/audit"
	"github.com/tcpmigrate/tcpmigrate/internal/certs"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/target"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// The hosts of the hostile-source tests: a peer, a source host holding the
// service address, and the target host the server restores into.
var (
	hPeer = netip.MustParsePrefix("198.18.0.1/24")
	hSrc  = netip.MustParsePrefix("198.18.0.2/24")
	hDst  = netip.MustParsePrefix("198.18.0.3/24")
	hSvc  = netip.MustParsePrefix("198.18.0.10/24")
	// fake is the peer address of every connection a hostile source makes
	// up: a socket to it on the target host is a socket the target should
	// never have created (or should have discarded).
	fake = netip.MustParseAddr("198.18.0.66")
)

const svcPort = 8080

// harness is a target agent restoring into the target host of a lab LAN,
// listening on loopback with mutual TLS, with certificates for honest and
// hostile sources.
type harness struct {
	t              *testing.T
	peer, src, dst *lab.NS
	ca             *certs.CA
	pool           *x509.CertPool
	caps           repair.Capabilities
	srcCert        tls.Certificate // role source
	srv            *target.Server
	addr           string // the server's listener, 127.0.0.1:port
	auditPath      string
	delivered      chan *target.Delivered
}

func newHarness(t *testing.T, pol target.Policy) *harness {
	t.Helper()
	lan := lab.NewTestLAN(t, "peer", "src", "dst")
	h := &harness{t: t, peer: lan.Host("peer"), src: lan.Host("src"), dst: lan.Host("dst"),
		delivered: make(chan *target.Delivered, 4)}
	for ns, p := range map[*lab.NS]netip.Prefix{h.peer: hPeer, h.src: hSrc, h.dst: hDst} {
		if err := ns.AddAddr(p); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.src.AddAddr(hSvc); err != nil {
		t.Fatal(err)
	}
	var err error
	if h.ca, err = certs.NewCA("hostile test CA", time.Hour); err != nil {
		t.Fatal(err)
	}
	h.pool = x509.NewCertPool()
	h.pool.AddCert(h.ca.Cert)
	if h.caps, err = repair.Probe(); err != nil {
		t.Fatal(err)
	}
	h.srcCert = h.cert(certs.RoleSource)
	dst := h.cert(certs.RoleTarget)
	tc := transport.NewConfig(&tls.Config{Certificates: []tls.Certificate{dst}, RootCAs: h.pool, ClientCAs: h.pool})
	tc.Capabilities = h.caps
	h.auditPath = filepath.Join(t.TempDir(), "audit.log")
	al, err := audit.Open(h.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("target agent's log:\n%s", logs.String())
		}
	})
	h.srv, err = target.NewServer(target.Config{
		Log:        slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Transport:  tc,
		NetNS:      h.dst.Handle(),
		Allow:      []netip.Prefix{netip.PrefixFrom(hSvc.Addr(), 32)},
		Policy:     pol,
		Audit:      al,
		JournalDir: t.TempDir(),
		Claim: func(context.Context, []netip.Prefix) error {
			if err := h.dst.AddAddr(hSvc); err != nil {
				return err
			}
			return h.peer.FlushNeigh(hSvc.Addr())
		},
		Unclaim: func(context.Context, []netip.Prefix) error { return h.dst.DelAddr(hSvc) },
		Deliver: func(_ context.Context, ds []*target.Delivered) map[uint32]error {
			for _, d := range ds {
				h.delivered <- d
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- h.srv.ServeListener(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("ServeListener: %v", err)
		}
		al.Close()
	})
	return h
}

// syncBuffer is a bytes.Buffer for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// cert mints a certificate for 127.0.0.1 naming the given roles.
func (h *harness) cert(roles ...certs.Role) tls.Certificate {
	h.t.Helper()
	name := "no-role"
	if len(roles) > 0 {
		name = string(roles[0])
	}
	host, err := h.ca.IssueRoles(name, []string{"127.0.0.1"}, time.Hour, roles...)
	if err != nil {
		h.t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(host.CertPEM, host.KeyPEM)
	if err != nil {
		h.t.Fatal(err)
	}
	return pair
}

// roleless mints a certificate the CA signed for something else than
// tcpmigrate: valid for TLS both ways, but naming no tcpmigrate role.
func (h *harness) roleless(cn string) tls.Certificate {
	h.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		h.t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, h.ca.Cert, &key.PublicKey, h.ca.Key)
	if err != nil {
		h.t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		h.t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}))
	if err != nil {
		h.t.Fatal(err)
	}
	return pair
}

// sourceConfig returns a link configuration presenting cert.
func (h *harness) sourceConfig(cert tls.Certificate) *transport.Config {
	c := transport.NewConfig(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: h.pool, ClientCAs: h.pool})
	c.Capabilities = h.caps
	return c
}

// dial opens a link to the server with the transport's Go API.
func (h *harness) dial(t *testing.T, cert tls.Certificate) *transport.Link {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := transport.Dial(ctx, h.addr, h.sourceConfig(cert))
	if err != nil {
		t.Fatalf("dial the target: %v", err)
	}
	return l
}

// query asks the server for a migration's outcome over a new link: it
// also proves that the server still accepts and answers.
func (h *harness) query(t *testing.T, id transport.MigrationID) transport.MigrationState {
	t.Helper()
	l := h.dial(t, h.srcCert)
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The target may answer and close the link before yamux tells Send
	// that its frame went out; the answer is still there to be read.
	serr := l.Control().Send(ctx, &transport.Query{Migration: id})
	if serr != nil && !errors.Is(serr, transport.ErrPeerLost) {
		t.Fatalf("query: %v", serr)
	}
	m, err := l.Control().Recv(ctx)
	if err != nil {
		t.Fatalf("query: %v (send: %v)", err, serr)
	}
	o, ok := m.(*transport.Outcome)
	if !ok {
		t.Fatalf("query answered with %s", m.Type())
	}
	return o.State
}

// eventually polls f until it returns nil, and fails the test with its
// last error if that takes longer than d.
func eventually(t *testing.T, d time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %v", d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// sockets returns the lines of `ss -tan` in the target host that name the
// fake peer: sockets of made-up connections, in repair mode or not.
func (h *harness) sockets() ([]string, error) {
	out, err := h.dst.Exec("ss", "-Htan")
	if err != nil {
		return nil, err
	}
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, fake.String()+":") {
			lines = append(lines, strings.Join(strings.Fields(l), " "))
		}
	}
	return lines, nil
}

// lockTables returns the nftables tables of the target host that belong
// to the target's migrations (tgt-...), or to the one named if id is set.
func (h *harness) lockTables(id *transport.MigrationID) ([]string, error) {
	out, err := h.dst.Exec("nft", "list", "tables")
	if err != nil {
		return nil, err
	}
	want := "tgt-"
	if id != nil {
		want += id.String()[:16]
	}
	var tables []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, want) {
			tables = append(tables, strings.TrimSpace(l))
		}
	}
	return tables, nil
}

// assertClean waits until the target host holds no socket of a made-up
// connection and no lock table of the migration (of any target migration
// if id is nil), then checks that the server still answers a query and
// that the migration is not recorded as anything but aborted or unknown.
func (h *harness) assertClean(t *testing.T, id *transport.MigrationID) {
	t.Helper()
	eventually(t, 10*time.Second, func() error {
		socks, err := h.sockets()
		if err != nil {
			return err
		}
		if len(socks) > 0 {
			return fmt.Errorf("sockets left on the target: %q", socks)
		}
		tables, err := h.lockTables(id)
		if err != nil {
			return err
		}
		if len(tables) > 0 {
			return fmt.Errorf("lock tables left on the target: %q", tables)
		}
		return nil
	})
	if id != nil {
		if st := h.query(t, *id); st != transport.StateAborted && st != transport.StateUnknown {
			t.Errorf("the target records migration %s as %s", id, st)
		}
	}
}

// auditRecords reads the audit log.
func (h *harness) auditRecords(t *testing.T) []audit.Record {
	t.Helper()
	f, err := os.Open(h.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var recs []audit.Record
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 4<<20)
	for sc.Scan() {
		var r audit.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		recs = append(recs, r)
	}
	return recs
}

// auditRecord waits for an audit record that match accepts.
func (h *harness) auditRecord(t *testing.T, what string, match func(*audit.Record) bool) audit.Record {
	t.Helper()
	var found *audit.Record
	eventually(t, 5*time.Second, func() error {
		for _, r := range h.auditRecords(t) {
			if match(&r) {
				found = &r
				return nil
			}
		}
		return fmt.Errorf("no audit record of %s", what)
	})
	return *found
}

// heapPeak runs f while sampling the heap, and returns how far HeapInuse
// rose above where it was before.
func heapPeak(f func()) uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base, peak := ms.HeapInuse, ms.HeapInuse
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				peak = max(peak, ms.HeapInuse)
			}
		}
	}()
	f()
	close(stop)
	<-done
	return peak - base
}

// fakeSnapshot returns a snapshot of an established IPv4 connection
// between local and the fake peer that repair's Validate and the target's
// consistency checks accept: the policy tests' good snapshot, moved.
func fakeSnapshot(local netip.AddrPort, remotePort uint16) *repair.Snapshot {
	s := target.GoodSnapshot()
	s.Local, s.Remote = local, netip.AddrPortFrom(fake, remotePort)
	return s
}

// The raw speaker: a source written from docs/protocol.md with hand-made
// frames, for what the transport's Go API refuses to send.

func appendField(b []byte, tag uint64, v []byte) []byte {
	b = binary.AppendUvarint(b, tag)
	b = binary.AppendUvarint(b, uint64(len(v)))
	return append(b, v...)
}

func appendUint(b []byte, tag, v uint64) []byte {
	if v == 0 {
		return b
	}
	return appendField(b, tag, binary.AppendUvarint(nil, v))
}

func rawFrame(typ byte, body []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(1+len(body)))
	b = append(b, typ)
	return append(b, body...)
}

func rawAddrPort(ap netip.AddrPort) []byte {
	b := ap.Addr().AsSlice()
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

// rawRecord encodes a SNAPSHOT record (docs/protocol.md §7.2) as it is,
// checked by nothing.
func rawRecord(index uint32, s *repair.Snapshot) []byte {
	var b []byte
	b = appendUint(b, 1, uint64(index))
	b = appendField(b, 2, rawAddrPort(s.Local))
	b = appendField(b, 3, rawAddrPort(s.Remote))
	b = appendUint(b, 4, uint64(s.Family))
	b = appendUint(b, 5, uint64(s.State))
	b = appendUint(b, 6, uint64(s.Flags))
	b = appendUint(b, 8, uint64(s.SndWScale))
	b = appendUint(b, 9, uint64(s.RcvWScale))
	b = appendUint(b, 10, uint64(s.MSSClamp))
	b = appendUint(b, 11, uint64(s.Timestamp))
	b = appendUint(b, 12, uint64(s.SendSeq))
	b = appendUint(b, 13, uint64(s.RecvSeq))
	var w []byte
	for _, v := range []uint32{s.Window.SndWl1, s.Window.SndWnd, s.Window.MaxWindow, s.Window.RcvWnd, s.Window.RcvWup} {
		w = binary.BigEndian.AppendUint32(w, v)
	}
	b = appendField(b, 14, w)
	b = appendUint(b, 17, uint64(s.Unsent))
	zz := func(v int32) uint64 { return uint64(uint32(v<<1) ^ uint32(v>>31)) }
	o := &s.Options
	var opts []byte
	opts = appendUint(opts, 2, zz(o.SndBuf))
	opts = appendUint(opts, 3, zz(o.RcvBuf))
	opts = appendUint(opts, 8, zz(o.KeepIdle))
	opts = appendUint(opts, 9, zz(o.KeepIntvl))
	opts = appendUint(opts, 10, zz(o.KeepCnt))
	opts = appendUint(opts, 16, uint64(o.Mark))
	opts = appendUint(opts, 18, zz(o.RcvLowat))
	opts = appendUint(opts, 27, zz(o.Linger2))
	opts = appendUint(opts, 33, zz(o.TTL))
	b = appendField(b, 18, opts)
	if len(s.RecvQueue) > 0 {
		b = appendField(b, 15, s.RecvQueue)
	}
	if len(s.SendQueue) > 0 {
		b = appendField(b, 16, s.SendQueue)
	}
	return rawFrame(0x20, b)
}

// rawChunk wraps a snapshot stream's body bytes (or a zstd frame) in a
// chunk.
func rawChunk(payload []byte, compressed bool) []byte {
	h := uint32(len(payload))
	if compressed {
		h |= 1 << 31
	}
	return append(binary.BigEndian.AppendUint32(nil, h), payload...)
}

// rleBomb returns a zstd frame (RFC 8878) of blocks run-length blocks of
// 128 KiB of zeros each: 4 bytes on the wire per 128 KiB decoded.
func rleBomb(blocks int) []byte {
	b := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3} // magic; no FCS, no checksum; window 2^17
	for i := range blocks {
		h := uint32(128<<10)<<3 | 1<<1 // size, RLE
		if i == blocks-1 {
			h |= 1 // last block
		}
		b = append(b, byte(h), byte(h>>8), byte(h>>16), 0)
	}
	return b
}

// field is a field of a received frame.
type field struct {
	tag uint64
	v   []byte
}

func parseFields(b []byte) ([]field, error) {
	var fs []field
	for len(b) > 0 {
		tag, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, errors.New("bad tag")
		}
		b = b[n:]
		l, n := binary.Uvarint(b)
		if n <= 0 || uint64(len(b)-n) < l {
			return nil, errors.New("bad length")
		}
		fs = append(fs, field{tag, b[n : n+int(l)]})
		b = b[n+int(l):]
	}
	return fs, nil
}

func fieldUint(fs []field, tag uint64) uint64 {
	var v uint64
	for _, f := range fs {
		if f.tag == tag {
			v, _ = binary.Uvarint(f.v)
		}
	}
	return v
}

func fieldString(fs []field, tag uint64) string {
	for _, f := range fs {
		if f.tag == tag {
			return string(f.v)
		}
	}
	return ""
}

func readRawFrame(r io.Reader) (byte, []byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 || n > 16<<20 {
		return 0, nil, fmt.Errorf("frame of length %d", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return 0, nil, err
	}
	return b[0], b[1:], nil
}

// rawSource is a hostile source speaking the protocol by hand over TLS
// and yamux.
type rawSource struct {
	t    *testing.T
	tc   *tls.Conn
	sess *yamux.Session
	ctrl *yamux.Stream
	id   transport.MigrationID
}

// dialTLS opens a TLS connection to the server presenting cert.
func (h *harness) dialTLS(t *testing.T, cert tls.Certificate) *tls.Conn {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second}
	tc, err := tls.DialWithDialer(d, "tcp", h.addr, &tls.Config{Certificates: []tls.Certificate{cert},
		RootCAs: h.pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatalf("TLS dial: %v", err)
	}
	return tc
}

// preambleHello is the client's first bytes: the preamble and a Hello with
// the features of this kernel and both codecs.
func (h *harness) preambleHello() []byte {
	b := append([]byte("TMIG"), 0, 1, 0, 1)
	var hello []byte
	hello = appendUint(hello, 1, uint64(h.caps.Features))
	hello = appendUint(hello, 4, 3)
	return append(b, rawFrame(0x01, hello)...)
}

// dialRaw runs the handshake by hand and opens the control stream.
func (h *harness) dialRaw(t *testing.T) *rawSource {
	t.Helper()
	r, err := h.openRaw(h.srcCert)
	if err != nil {
		t.Fatalf("raw source: %v", err)
	}
	r.t = t
	t.Cleanup(r.close)
	return r
}

// openRaw is dialRaw for any goroutine: it returns its errors.
func (h *harness) openRaw(cert tls.Certificate) (*rawSource, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	tc, err := tls.DialWithDialer(d, "tcp", h.addr, &tls.Config{Certificates: []tls.Certificate{cert},
		RootCAs: h.pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13})
	if err != nil {
		return nil, err
	}
	r := &rawSource{tc: tc, id: transport.NewMigrationID()}
	if err := r.handshake(h.preambleHello()); err != nil {
		r.close()
		return nil, err
	}
	return r, nil
}

func (r *rawSource) handshake(hello []byte) error {
	_ = r.tc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := r.tc.Write(hello); err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	var pre [8]byte
	if _, err := io.ReadFull(r.tc, pre[:]); err != nil || !bytes.Equal(pre[:4], []byte("TMIG")) {
		return fmt.Errorf("preamble % x: %v", pre, err)
	}
	for _, want := range []byte{0x01, 0x02} { // Hello, Accept
		typ, body, err := readRawFrame(r.tc)
		if err != nil || typ != want {
			fs, _ := parseFields(body)
			return fmt.Errorf("handshake: frame %#x (%q), want %#x: %v", typ, fieldString(fs, 2), want, err)
		}
	}
	if _, err := r.tc.Write(rawFrame(0x02, nil)); err != nil {
		return err
	}
	_ = r.tc.SetDeadline(time.Time{})
	cfg := yamux.DefaultConfig()
	cfg.LogOutput = io.Discard
	var err error
	if r.sess, err = yamux.Client(r.tc, cfg); err != nil {
		return err
	}
	if r.ctrl, err = r.sess.OpenStream(); err != nil {
		return err
	}
	return r.write(rawFrame(0x04, appendUint(nil, 1, 1))) // STREAM_OPEN control
}

func (r *rawSource) close() {
	if r.sess != nil {
		r.sess.Close()
	}
	r.tc.Close()
}

// write writes bytes on the control stream.
func (r *rawSource) write(b []byte) error {
	_ = r.ctrl.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := r.ctrl.Write(b)
	return err
}

// send writes bytes on the control stream, or fails the test. A session
// the target has already ended is not a failure: yamux reports it even
// for bytes that went out, when the target reads them, refuses them and
// closes the link at once; what it answered is still there to be read.
func (r *rawSource) send(b []byte) {
	r.t.Helper()
	if err := r.write(b); err != nil && !errors.Is(err, yamux.ErrSessionShutdown) {
		r.t.Fatalf("control write: %v", err)
	}
}

func prepareFrame(id transport.MigrationID, count uint32) []byte {
	body := appendField(nil, 1, id[:])
	body = appendUint(body, 2, uint64(count))
	return rawFrame(0x10, body)
}

// prepare sends PREPARE{id, count}.
func (r *rawSource) prepare(count uint32) {
	r.t.Helper()
	r.send(prepareFrame(r.id, count))
}

// openStream opens a snapshot stream (codec 0 none, 1 zstd).
func (r *rawSource) openStream(codec uint64) (*yamux.Stream, error) {
	st, err := r.sess.OpenStream()
	if err != nil {
		return nil, err
	}
	_ = st.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if _, err := st.Write(rawFrame(0x04, appendUint(appendUint(nil, 1, 2), 2, codec))); err != nil {
		return nil, err
	}
	return st, nil
}

// stream opens a snapshot stream, or fails the test.
func (r *rawSource) stream(codec uint64) *yamux.Stream {
	r.t.Helper()
	st, err := r.openStream(codec)
	if err != nil {
		r.t.Fatal(err)
	}
	return st
}

// verdict is a verdict read from the control stream.
type verdict struct {
	index  uint32
	code   transport.VerdictCode
	reason string
}

// reply is what the target said on the control stream until it stopped
// or until what was waited for came.
type reply struct {
	verdicts  []verdict
	prepared  bool
	abortCode transport.AbortCode
	reason    string
	err       error // why reading stopped, if not an Abort or Prepared
}

// await reads control frames until an Abort (or, if untilPrepared, a
// Prepared), the end of the link, or the timeout.
func (r *rawSource) await(timeout time.Duration, untilPrepared bool) reply {
	_ = r.ctrl.SetReadDeadline(time.Now().Add(timeout))
	var rep reply
	for {
		typ, body, err := readRawFrame(r.ctrl)
		if err != nil {
			rep.err = err
			return rep
		}
		fs, err := parseFields(body)
		if err != nil {
			rep.err = err
			return rep
		}
		switch typ {
		case 0x11: // VERDICTS
			for _, f := range fs {
				if f.tag != 2 {
					continue
				}
				vf, _ := parseFields(f.v)
				rep.verdicts = append(rep.verdicts, verdict{uint32(fieldUint(vf, 1)), transport.VerdictCode(fieldUint(vf, 2)), fieldString(vf, 3)})
			}
		case 0x12: // PREPARED
			rep.prepared = true
			if untilPrepared {
				return rep
			}
		case 0x17: // ABORT
			rep.abortCode, rep.reason = transport.AbortCode(fieldUint(fs, 2)), fieldString(fs, 3)
			return rep
		}
	}
}

// expectAbort waits for the target's Abort and checks its code and that
// its reason says want.
func (r *rawSource) expectAbort(timeout time.Duration, code transport.AbortCode, want string) reply {
	r.t.Helper()
	rep := r.await(timeout, false)
	if rep.abortCode != code || !strings.Contains(rep.reason, want) {
		r.t.Fatalf("target answered abort %s %q (reading stopped by %v), want abort %s saying %q",
			rep.abortCode, rep.reason, rep.err, code, want)
	}
	r.t.Logf("refused: abort %s: %s", rep.abortCode, rep.reason)
	return rep
}
