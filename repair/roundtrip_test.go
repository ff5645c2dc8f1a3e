package repair

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const peerPort = 5000

// TestRoundTripCrossHost moves a live connection between two hosts: it is
// dumped on the source with unread received data, sent-unacknowledged data
// and never-sent data queued, discarded there silently, restored on the
// target before the service address has moved there, and resumed once the
// address has moved. The peer, the kernel's own TCP stack, then checks every
// byte of both streams, including megabytes sent after the move, and a
// capture on the bridge shows no RST and no FIN.
func TestRoundTripCrossHost(t *testing.T) {
	for _, tc := range []struct {
		name   string
		v6     bool
		family int
		setup  func(fd int) error
		ahead  bool // restored on a Blank, with the namespace's Defaults
		preset int  // the Blank preset (Restorer.Preset): presetSame or presetWrong
	}{
		{"ipv4", false, unix.AF_INET, setUnusualOptions, false, 0},
		{"ipv6", true, unix.AF_INET6, setUnusualOptions, false, 0},
		{"ipv4-mapped", false, unix.AF_INET6, setUnusualOptions, false, 0},
		// Options left at their defaults, which the restore does not
		// write again: they must read back the same all the same.
		{"ipv4-default-options", false, unix.AF_INET, nil, false, 0},
		// The socket made before the freeze (a Blank), and the options
		// equal to the namespace's defaults left alone.
		// SO_BINDTODEVICE must precede bind: that one is restored on a new
		// socket (the Blank is closed); the others on the Blank.
		{"ipv4-blank-device", false, unix.AF_INET, setUnusualOptions, true, 0},
		{"ipv4-blank", false, unix.AF_INET, setUnusualUnbound, true, 0},
		{"ipv6-blank", true, unix.AF_INET6, setUnusualUnbound, true, 0},
		{"ipv4-mapped-blank", false, unix.AF_INET6, setUnusualUnbound, true, 0},
		{"ipv4-default-options-blank", false, unix.AF_INET, nil, true, 0},
		{"ipv6-default-options-blank", true, unix.AF_INET6, nil, true, 0},
		// A Blank preset with the source's options (the restore writes
		// none of them again), and one preset with other values for every
		// option Preset sets (the restore must put the snapshot's back,
		// defaults included).
		{"ipv4-blank-preset", false, unix.AF_INET, setUnusualUnbound, true, presetSame},
		{"ipv6-blank-preset-wrong", true, unix.AF_INET6, setUnusualUnbound, true, presetWrong},
		{"ipv4-default-options-blank-preset", false, unix.AF_INET, nil, true, presetSame},
		{"ipv4-default-options-blank-preset-wrong", false, unix.AF_INET, nil, true, presetWrong},
		// A low TCP_NOTSENT_LOWAT and a megabyte never sent: the lowat is
		// not preset (the never-sent bytes go into a zero window and would
		// stop at the mark), so the restore takes them all.
		{"ipv4-blank-preset-lowat", false, unix.AF_INET, setUnusualUnbound, true, presetLowat},
		// The restore trusts the preset: an option changed on the Blank
		// behind its back after Preset stays as changed (the test of the
		// writes a preset saves).
		{"ipv4-blank-preset-skips", false, unix.AF_INET, setUnusualUnbound, true, presetTampered},
	} {
		t.Run(tc.name, func(t *testing.T) { testRoundTrip(t, tc.v6, tc.family, tc.setup, tc.ahead, tc.preset) })
	}
}

// How testRoundTrip presets its Blank.
const (
	presetSame     = 1 // with the snapshot's options
	presetWrong    = 2 // with other values for each option Preset sets
	presetLowat    = 3 // presetSame, the snapshot's TCP_NOTSENT_LOWAT lowered to 16 KiB
	presetTampered = 4 // presetSame, then TCP_USER_TIMEOUT changed on the Blank directly
)

// tamperedUserTimeout is what presetTampered sets TCP_USER_TIMEOUT to.
const tamperedUserTimeout = 4321

// wantPreset fails the test unless the socket of b has the values of p
// for every option Preset sets.
func wantPreset(t *testing.T, b *Blank, p *Options) {
	t.Helper()
	for i := range presetOpts {
		o := &presetOpts[i]
		v, err := unix.GetsockoptInt(b.fd, o.level, o.name)
		if err != nil {
			t.Fatalf("getsockopt %s on the preset Blank: %v", o.what, err)
		}
		if want := o.get(p); int32(v) != want && !(want != 0 && v != 0 && (o.name == unix.SO_KEEPALIVE || o.name == unix.TCP_NODELAY || o.name == unix.SO_OOBINLINE)) {
			t.Errorf("preset Blank: %s = %d, want %d", o.what, v, want)
		}
	}
}

// otherPreset returns o's preset part (PresetOf) with every member
// changed: the booleans flipped, the numbers moved to other valid values.
func otherPreset(o *Options) Options {
	p := PresetOf(o)
	p.NoDelay, p.KeepAlive, p.OOBInline = !p.NoDelay, !p.KeepAlive, !p.OOBInline
	p.KeepIdle, p.KeepIntvl, p.KeepCnt = p.KeepIdle%100+7, p.KeepIntvl%100+3, p.KeepCnt%100+2
	p.UserTimeout = p.UserTimeout + 1500
	return p
}

func testRoundTrip(t *testing.T, v6 bool, family int, setup func(fd int) error, ahead bool, preset int) {
	h := newHosts(t, v6)
	peerAP := netip.AddrPortFrom(h.peerAddr, peerPort)
	local := netip.AddrPortFrom(h.svc, 40001)
	// A small receive buffer on the peer fills quickly, so the source keeps
	// never-sent data.
	src, peer := dialPeer(t, h, family, local, peerAP, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 32<<10)
	}, setup)
	defer src.Close()
	defer peer.Close()
	stopCapture := captureFlags(t, h.lan, peerPort, v6)
	before := tcpCounters(t, h.peer)

	// Unread data in the source's receive queue.
	const toSrc = 64 << 10
	if err := writeStream(peer, 1, 0, toSrc); err != nil {
		t.Fatal(err)
	}
	srcFd := fdOf(t, src)
	waitFor(t, "data in the source's receive queue", 5*time.Second, func() bool {
		n, _ := unix.IoctlGetInt(srcFd, unix.SIOCINQ)
		return n == toSrc
	})

	// Sent-unacknowledged data: drop the peer's ACKs, then write. The
	// peer's window soon closes, so the rest stays never sent.
	nftLock(t, h.src, local, peerAP, true, false)
	src.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
	fromSrc, _ := writeStreamN(src, 0, 0, 3<<20)
	src.SetWriteDeadline(time.Time{})
	nftUnlock(t, h.src)
	nftLock(t, h.src, local, peerAP, true, true)

	var snap Snapshot
	if err := h.src.Do(func() error { return Dump(srcFd, &snap) }); err != nil {
		t.Fatal(err)
	}
	t.Logf("dumped: state %s recvq %d sendq %d (unsent %d) mss %d wscale %d/%d flags %#x",
		snap.State, len(snap.RecvQueue), len(snap.SendQueue), snap.Unsent, snap.MSSClamp, snap.SndWScale, snap.RcvWScale, snap.Flags)
	if len(snap.RecvQueue) != toSrc {
		t.Fatalf("receive queue %d bytes, want %d", len(snap.RecvQueue), toSrc)
	}
	if int64(len(snap.SendQueue)) > fromSrc || snap.Unsent == 0 || len(snap.SentUnacked()) == 0 {
		t.Fatalf("send queue %d bytes (unsent %d) of %d written: the test needs both sent-unacked and never-sent data",
			len(snap.SendQueue), snap.Unsent, fromSrc)
	}
	// The peer already holds everything before the send queue.
	peerHas := fromSrc - int64(len(snap.SendQueue))
	if err := checkBytes(snap.RecvQueue, 1, 0); err != nil {
		t.Fatal("receive queue: ", err)
	}
	if err := checkBytes(snap.SendQueue, 0, peerHas); err != nil {
		t.Fatal("send queue: ", err)
	}

	// A second dump of the held connection is equal but for the timestamp
	// clock, which moves on.
	again := snap
	again.RecvQueue, again.SendQueue = nil, nil
	if err := Capture(srcFd, &again); err != nil {
		t.Fatal(err)
	}
	if seqAfter(snap.Timestamp, again.Timestamp) {
		t.Errorf("timestamp went back: %d then %d", snap.Timestamp, again.Timestamp)
	}
	again.Timestamp = snap.Timestamp
	if d := diffFields(snap, again); len(d) != 0 {
		t.Errorf("second dump differs: %v", d)
	}
	srcInfo := tcpInfo(t, srcFd)

	// The source lets go silently; its lock stays until the address moved.
	if err := Discard(dupFd(t, srcFd)); err != nil {
		t.Fatal(err)
	}
	src.Close()

	var blank *Blank
	var r Restorer
	if ahead {
		// Made before the lock and before the address is on the host, as
		// the target makes them while the source holds its connections.
		if err := h.dst.Do(func() (err error) {
			if r.Defaults, err = ReadDefaults(); err != nil {
				return err
			}
			if blank, err = NewBlank(snap.Local); err != nil {
				return err
			}
			var p Options
			switch preset {
			case 0:
				return nil
			case presetWrong:
				p = otherPreset(&snap.Options)
			case presetLowat:
				snap.Options.NotSentLowat = 16 << 10
				p = snap.Options
			default:
				p = snap.Options
			}
			if err := r.Preset(blank, &p); err != nil {
				return err
			}
			wantPreset(t, blank, &p)
			if preset == presetTampered {
				if err := unix.SetsockoptInt(blank.fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, tamperedUserTimeout); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		// The source's options decide whether the Blank fits.
		wantFit := snap.Options.Mask&OptBindToDevice == 0
		if got := blank.Fits(&snap); got != wantFit {
			t.Fatalf("blank fits the snapshot: %v, want %v (options mask %#x)", got, wantFit, snap.Options.Mask)
		}
	}
	nftLock(t, h.dst, local, peerAP, true, true)
	var fd int
	if err := h.dst.Do(func() (err error) { fd, err = r.RestoreBlank(blank, &snap); return err }); err != nil {
		t.Fatal(err)
	}
	wantNoQueue(t, fd)
	h.moveService(t)
	nftUnlock(t, h.dst)
	if err := Resume(fd, &snap); err != nil {
		t.Fatal(err)
	}
	// The options are read before the socket becomes a net.Conn: Go's
	// FileConn turns keepalive on with its own times (15 s, 15 s, 9),
	// which would hide what the restore wrote.
	var got Options
	if op, err := readOptions(fd, snap.Family, &got); err != nil {
		t.Fatal(op, err)
	}
	restored := restoredConn(t, fd)
	defer restored.Close()
	rfd := fdOf(t, restored)

	// What carried across reads back equal.
	compareInfo(t, srcInfo, tcpInfo(t, rfd))
	// The unusual options pin the send buffer (SO_BUF_LOCK 1); defaults
	// leave both buffers autotuned (0).
	want := snap.Options
	if preset == presetTampered {
		// Not written again: the snapshot's value equals the preset's.
		want.UserTimeout = tamperedUserTimeout
	}
	compareOptions(t, want, got, b2i(setup != nil))

	// Every byte of both streams, then 4 MiB more each way.
	const more = 4 << 20
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	deadline := time.Now().Add(60 * time.Second)
	restored.SetDeadline(deadline)
	peer.SetDeadline(deadline)
	wg.Add(4)
	go func() { defer wg.Done(); errs <- checkStream(restored, 1, 0, toSrc+more) }()
	go func() { defer wg.Done(); errs <- checkStream(peer, 0, 0, fromSrc+more) }()
	go func() { defer wg.Done(); errs <- writeStream(restored, 0, fromSrc, more) }()
	go func() { defer wg.Done(); errs <- writeStream(peer, 1, toSrc, more) }()
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	nftUnlock(t, h.src)

	if segs := stopCapture(); len(segs) != 0 {
		t.Errorf("capture saw RST or FIN segments:\n%v", segs)
	}
	wantPeerNoReset(t, h, before)
}

// writeStreamN writes up to n bytes of the pattern and returns how many the
// kernel took before the write deadline.
func writeStreamN(c *net.TCPConn, dir byte, off, n int64) (int64, error) {
	buf := make([]byte, n)
	pattern(buf, dir, off)
	m, err := c.Write(buf)
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		return int64(m), err
	}
	return int64(m), nil
}

func checkBytes(b []byte, dir byte, off int64) error {
	return checkStream(bytesReader(b), dir, off, int64(len(b)))
}

type sliceReader struct{ b []byte }

func (r *sliceReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, errors.New("EOF")
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

func bytesReader(b []byte) *sliceReader { return &sliceReader{b} }

func dupFd(t *testing.T, fd int) int {
	t.Helper()
	d, err := unix.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// setUnusualOptions gives the source socket non-default values of the
// options a migration carries, so the test sees them travel.
// setUnusualUnbound is setUnusualOptions without SO_BINDTODEVICE.
func setUnusualUnbound(fd int) error { return setUnusual(fd, false) }

func setUnusualOptions(fd int) error { return setUnusual(fd, true) }

func setUnusual(fd int, device bool) error {
	set := []struct{ level, opt, val int }{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 77},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 11},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 5},
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
		{unix.SOL_SOCKET, unix.SO_MARK, 0x42},
		{unix.SOL_SOCKET, unix.SO_PRIORITY, 3},
		{unix.SOL_SOCKET, unix.SO_RCVLOWAT, 2},
		{unix.SOL_SOCKET, unix.SO_SNDBUF, 1 << 20}, // pins the send buffer; the receive side stays autotuned
		{unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, 123456},
		{unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, 1 << 20},
		{unix.IPPROTO_TCP, unix.TCP_LINGER2, 17},
		{unix.IPPROTO_IP, unix.IP_TOS, 0x20},
		{unix.IPPROTO_IP, unix.IP_TTL, 33},
	}
	for _, s := range set {
		if err := unix.SetsockoptInt(fd, s.level, s.opt, s.val); err != nil {
			return err
		}
	}
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 7}); err != nil {
		return err
	}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 9}); err != nil {
		return err
	}
	if err := unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION, "reno"); err != nil {
		return err
	}
	if device {
		if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, "eth0"); err != nil {
			return err
		}
	}
	if d, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); d == unix.AF_INET6 {
		return unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_TCLASS, 0x28)
	}
	return nil
}

// compareOptions checks that every carried option reads back equal. The
// receive buffer is autotuned on both ends, so only its lock bit is compared.
func compareOptions(t *testing.T, want, got Options, bufLock int32) {
	t.Helper()
	if want.RcvBuf > got.RcvBuf {
		t.Errorf("receive buffer shrank: %d -> %d", want.RcvBuf, got.RcvBuf)
	}
	want.RcvBuf, got.RcvBuf = 0, 0
	if int32(want.BufLock) != bufLock {
		t.Errorf("source SO_BUF_LOCK %d, want %d", want.BufLock, bufLock)
	}
	if d := diffFields(want, got); len(d) != 0 {
		t.Errorf("options differ after restore (source vs restored): %v", d)
	}
}

// info is what TCP_INFO says of the negotiated connection.
type info struct {
	options, wscale byte
	sndMSS          uint32
	congestion      string
}

func tcpInfo(t *testing.T, fd int) info {
	t.Helper()
	var ti tcpInfoHead
	if err := getInfo(fd, &ti); err != nil {
		t.Fatal("TCP_INFO: ", err)
	}
	cc, err := unix.GetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	if err != nil {
		t.Fatal(err)
	}
	return info{options: ti.Options &^ tcpiOptECN, wscale: ti.WScale, sndMSS: ti.SndMSS, congestion: cc}
}

func compareInfo(t *testing.T, src, dst info) {
	t.Helper()
	if src != dst {
		t.Errorf("TCP_INFO differs: source %+v, restored %+v", src, dst)
	}
	if src.options&(tcpiOptSACK|tcpiOptTimestamps|tcpiOptWScale) != tcpiOptSACK|tcpiOptTimestamps|tcpiOptWScale {
		t.Errorf("source did not negotiate SACK, timestamps and window scaling: %#x", src.options)
	}
}
