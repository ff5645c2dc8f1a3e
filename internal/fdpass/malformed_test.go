package fdpass

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func listenRaw(path string) (net.Listener, error) { return net.Listen("unix", path) }

// rawPeer is a hand-driven dialer that sends whatever bytes and descriptors
// a case wants.
type rawPeer struct {
	t  *testing.T
	uc *net.UnixConn
}

func dialRaw(t *testing.T, path string) *rawPeer {
	t.Helper()
	uc, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	uc.SetDeadline(time.Now().Add(10 * time.Second))
	hello := make([]byte, HeaderLen+helloLen)
	if _, err := io.ReadFull(uc, hello); err != nil {
		t.Fatal(err)
	}
	if f, err := decodeFrame(hello, Limits{}); err != nil || f.kind != KindHello {
		t.Fatalf("listener's first frame: %+v, %v", f, err)
	}
	return &rawPeer{t: t, uc: uc}
}

// send writes b, attaching files to its first byte.
func (p *rawPeer) send(b []byte, files ...*os.File) {
	p.t.Helper()
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	n, _, err := p.uc.WriteMsgUnix(b, oob, nil)
	if err == nil && n < len(b) {
		_, err = p.uc.Write(b[n:])
	}
	if err != nil {
		p.t.Fatalf("raw send: %v", err)
	}
}

// errorFrame reads what the listener sent after the failure: it must be an
// error frame with the code. (What follows may be ECONNRESET rather than EOF:
// a unix socket closed with unread data reports that to its peer.)
func (p *rawPeer) errorFrame(want ErrorCode) {
	p.t.Helper()
	b := make([]byte, HeaderLen)
	if _, err := io.ReadFull(p.uc, b); err != nil {
		p.t.Fatalf("reading the error frame: %v", err)
	}
	h, err := parseHeader(b)
	if err != nil {
		p.t.Fatalf("error frame header: %v", err)
	}
	b = append(b, make([]byte, h.bodyLen)...)
	if _, err := io.ReadFull(p.uc, b[HeaderLen:]); err != nil {
		p.t.Fatalf("reading the error frame: %v", err)
	}
	f, err := decodeFrame(b, Limits{})
	if err != nil || f.kind != KindError || f.code != want {
		p.t.Fatalf("after the failure the peer got %+v, %v; want an error frame %v", f, err, want)
	}
}

func sockFrame(k Kind, items []Item, final bool) []byte {
	s := planBatch(items)[0]
	return appendBatchFrame(nil, k, items, s, final)
}

// TestMalformedFramesLeakNothing sends broken input with real sockets
// attached. Each case must fail with its sentinel error and a message that
// says what was wrong, the sender must get an error frame, and afterwards
// no descriptor may be left: the process has as many open as before, and
// the TCP peer of the passed socket sees FIN, which it only does once the
// last descriptor of the socket anywhere is closed.
func TestMalformedFramesLeakNothing(t *testing.T) {
	ns := newHost(t)
	ln := listenTemp(t, Policy{Limits: Limits{MaxBatch: 3}})
	hello := appendHello(nil, Limits{}.resolve())
	meta := Item{ID: 1, Local: netip.MustParseAddrPort("198.18.0.10:80"), Remote: netip.MustParseAddrPort("198.18.0.1:5000")}
	one := sockFrame(KindSockets, []Item{meta}, true)
	withVersion := func(b []byte, v byte) []byte { b = bytes.Clone(b); b[4] = v; return b }
	big := meta
	big.State = make([]byte, 2<<20)

	cases := []struct {
		name string
		run  func(p *rawPeer, sock *os.File)
		want error
		text string
		code ErrorCode // the error frame the sender gets back; 0: none (it sent one itself)
		pipe bool      // attach a pipe instead of the socket
	}{
		{name: "oversized blob", want: ErrTooLarge, text: "2097152 bytes, at most 1048576", code: CodeTooLarge,
			run: func(p *rawPeer, s *os.File) { p.send(hello); p.send(sockFrame(KindSockets, []Item{big}, true), s) }},
		{name: "truncated frame", want: ErrMalformed, text: "truncated frame", code: CodeMalformed,
			run: func(p *rawPeer, s *os.File) { p.send(hello); p.send(one[:HeaderLen+10], s); p.uc.CloseWrite() }},
		{name: "wrong version", want: ErrVersion, text: "peer speaks version 2", code: CodeVersion,
			run: func(p *rawPeer, s *os.File) { p.send(hello); p.send(withVersion(one, 2), s) }},
		{name: "wrong version hello", want: ErrVersion, text: "peer speaks version 7", code: CodeVersion,
			run: func(p *rawPeer, s *os.File) { p.send(withVersion(hello, 7)); p.send(one, s) }},
		{name: "garbage", want: ErrMalformed, text: "bad magic", code: CodeMalformed,
			run: func(p *rawPeer, s *os.File) { p.send([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), s) }},
		{name: "fds claimed, fewer attached", want: ErrFDCount, text: "claims 2 descriptors, 1 arrived", code: CodeFDCount,
			run: func(p *rawPeer, s *os.File) {
				p.send(hello)
				p.send(sockFrame(KindSockets, []Item{meta, {ID: 2}}, true), s)
			}},
		{name: "fds claimed, none attached", want: ErrFDCount, text: "claims 1 descriptors, 0 arrived", code: CodeFDCount,
			run: func(p *rawPeer, s *os.File) { p.send(hello); p.send(one) }},
		{name: "fd on a frame that claims none", want: ErrFDCount, text: "claims 0 descriptors, 1 arrived", code: CodeFDCount,
			run: func(p *rawPeer, s *os.File) { p.send(hello); p.send(appendIDs(nil, KindAck, []uint64{1}), s) }},
		{name: "not a TCP socket", want: ErrNotTCP, text: "not a socket", code: CodeNotTCP, pipe: true,
			run: func(p *rawPeer, s *os.File) { p.send(hello); p.send(one, s) }},
		{name: "unknown type", want: ErrMalformed, text: "unknown message type 9", code: CodeMalformed,
			run: func(p *rawPeer, s *os.File) { p.send(hello); b := bytes.Clone(one); b[5] = 9; p.send(b, s) }},
		{name: "sockets before hello", want: ErrUnexpected, text: "before the peer's hello", code: CodeUnexpected,
			run: func(p *rawPeer, s *os.File) { p.send(one, s) }},
		{name: "other frame inside a batch", want: ErrMalformed, text: "ack frame inside a sockets message", code: CodeMalformed,
			run: func(p *rawPeer, s *os.File) {
				p.send(hello)
				p.send(sockFrame(KindSockets, []Item{meta}, false), s)
				p.send(appendIDs(nil, KindAck, nil))
			}},
		{name: "duplicate ID across frames", want: ErrMalformed, text: "socket ID 1 twice", code: CodeMalformed,
			run: func(p *rawPeer, s *os.File) {
				p.send(hello)
				p.send(sockFrame(KindSockets, []Item{meta}, false), s)
				p.send(sockFrame(KindSockets, []Item{meta}, true), s)
			}},
		{name: "batch over the listener's limit", want: ErrTooLarge, text: "more than 3 sockets", code: CodeTooLarge,
			run: func(p *rawPeer, s *os.File) {
				p.send(hello)
				p.send(sockFrame(KindSockets, []Item{{ID: 1}, {ID: 2}}, false), s, s)
				p.send(sockFrame(KindSockets, []Item{{ID: 3}, {ID: 4}}, true), s, s)
			}},
		{name: "error frame inside a batch", want: ErrRejected, text: "peer reported rejected: changed my mind", code: 0,
			run: func(p *rawPeer, s *os.File) {
				p.send(hello)
				p.send(sockFrame(KindSockets, []Item{meta}, false), s)
				p.send(appendError(nil, CodeRejected, "changed my mind"))
			}},
		{name: "live and non-live frames in one message", want: ErrMalformed, text: "live and non-live frames in one sockets message", code: CodeMalformed,
			run: func(p *rawPeer, s *os.File) {
				p.send(hello)
				p.send(appendBatchFrameFlags(nil, KindSockets, []Item{meta}, planBatch([]Item{meta})[0], false, true), s)
				p.send(sockFrame(KindSockets, []Item{{ID: 2}}, true), s)
			}},
		{name: "second hello", want: ErrUnexpected, text: "second hello", code: CodeUnexpected,
			run: func(p *rawPeer, s *os.File) { p.send(hello); p.send(hello) }},
	}

	// Warm up what the runtime opens once (the poller), so that the count
	// below only moves with the case.
	_ = makePairs(t, ns, 1, srv4, cli4)

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := countFDs(t)
			pr := makePairs(t, ns, 1, srv4, cli4)[0]
			sock := item(t, pr, 1, nil).File
			var pw *os.File
			if c.pipe {
				r, w, err := os.Pipe()
				if err != nil {
					t.Fatal(err)
				}
				sock.Close()
				sock, pw = r, w
			}
			accepted := make(chan *Conn, 1)
			go func() {
				a, err := ln.Accept()
				if err != nil {
					t.Error(err)
				}
				accepted <- a
			}()
			p := dialRaw(t, ln.Path())
			agent := <-accepted
			if agent == nil {
				t.FailNow()
			}
			type res struct {
				m   Message
				err error
			}
			got := make(chan res, 1)
			go func() {
				m, err := agent.Receive()
				got <- res{m, err}
			}()
			c.run(p, sock)
			r := <-got
			m, err := r.m, r.err
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
				t.Errorf("receive: %+v, %v; want %v saying %q", m, err, c.want, c.text)
			}
			if _, again := agent.Receive(); again != err {
				t.Errorf("second receive: %v, want the same error", again)
			}
			if err := agent.SendAck(nil); err == nil {
				t.Error("send after a receive error succeeded")
			}
			if c.code != 0 {
				p.errorFrame(c.code)
			}
			t.Log(err)

			agent.Close()
			p.uc.Close()
			sock.Close()
			if pw != nil {
				// The last reader is gone only if the agent closed its copy.
				if _, err := pw.Write([]byte{1}); !errors.Is(err, unix.EPIPE) {
					t.Errorf("pipe write: %v, want EPIPE (the read end leaked)", err)
				}
				pw.Close()
			} else {
				expectFIN(t, pr.peer)
			}
			pr.peer.Close()
			if after := countFDs(t); after != before {
				t.Errorf("%d descriptors open before, %d after", before, after)
			}
		})
	}
}
