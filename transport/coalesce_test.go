package transport

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
)

// recordConn records the size of every Write, and passes it on.
type recordConn struct {
	net.Conn
	mu     sync.Mutex
	writes []int
}

func (c *recordConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes = append(c.writes, len(p))
	c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *recordConn) taken() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.writes
	c.writes = nil
	return w
}

// header is a yamux frame header.
func header(typ byte, length uint32) []byte {
	h := make([]byte, yamuxHeaderLen)
	h[1] = typ
	binary.BigEndian.PutUint32(h[4:], 7) // stream ID
	binary.BigEndian.PutUint32(h[8:], length)
	return h
}

func TestCoalesceConn(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	var got bytes.Buffer
	read := make(chan struct{})
	go func() { io.Copy(&got, b); close(read) }()
	rec := &recordConn{Conn: a}
	c := &coalesceConn{watchConn: &watchConn{Conn: rec}}
	var want bytes.Buffer
	write := func(p []byte) {
		t.Helper()
		want.Write(p)
		if n, err := c.Write(p); n != len(p) || err != nil {
			t.Fatalf("Write(%d bytes) = %d, %v", len(p), n, err)
		}
	}
	body := bytes.Repeat([]byte{0xab}, 100)
	long := make([]byte, maxCoalesce+1)
	for _, tc := range []struct {
		name   string
		frames [][]byte
		writes []int // what reaches the connection
	}{
		{"data frame", [][]byte{header(yamuxTypeData, 100), body}, []int{112}},
		{"window update", [][]byte{header(1, 100)}, []int{12}},
		{"ping", [][]byte{header(2, 1)}, []int{12}},
		{"data frame without a body (SYN, FIN)", [][]byte{header(yamuxTypeData, 0)}, []int{12}},
		{"long body", [][]byte{header(yamuxTypeData, uint32(len(long))), long}, []int{12, len(long)}},
		{"longest coalesced", [][]byte{header(yamuxTypeData, maxCoalesce), long[:maxCoalesce]}, []int{maxCoalesce + 12}},
	} {
		for _, f := range tc.frames {
			write(f)
		}
		if w := rec.taken(); !slices.Equal(w, tc.writes) {
			t.Errorf("%s: writes %v, want %v", tc.name, w, tc.writes)
		}
	}
	a.Close()
	<-read
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Errorf("the byte stream changed: %d bytes, want %d", got.Len(), want.Len())
	}
}

// TestCoalesceYamux pins what coalesceConn assumes of yamux: a stream's
// short write reaches the connection as one write, header and body
// together; a ping as a header alone.
func TestCoalesceYamux(t *testing.T) {
	a, b := net.Pipe()
	rec := &recordConn{Conn: a}
	cfg := yamux.DefaultConfig()
	cfg.EnableKeepAlive = false
	cfg.LogOutput = io.Discard
	client, err := yamux.Client(&coalesceConn{watchConn: &watchConn{Conn: rec}}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := yamux.Server(b, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	st, err := client.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	acc, err := server.AcceptStream()
	if err != nil {
		t.Fatal(err)
	}
	rec.taken() // the SYN
	msg := []byte("one control message")
	if _, err := st.Write(msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	acc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(acc, buf); err != nil || !bytes.Equal(buf, msg) {
		t.Fatalf("read %q, %v", buf, err)
	}
	if w := rec.taken(); !slices.Equal(w, []int{yamuxHeaderLen + len(msg)}) {
		t.Errorf("a stream write reached the connection as writes of %v bytes, want one of %d", w, yamuxHeaderLen+len(msg))
	}
	if _, err := client.Ping(); err != nil {
		t.Fatal(err)
	}
	if w := rec.taken(); !slices.Equal(w, []int{yamuxHeaderLen}) {
		t.Errorf("a ping reached the connection as writes of %v bytes, want one of %d", w, yamuxHeaderLen)
	}
	st.Close()
	acc.Close()
}
