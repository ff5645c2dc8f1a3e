// Package streamcheck runs the checksummed byte streams that the demo, the
// benchmarks and the end-to-end tests push through migrating connections:
// each endpoint writes a pattern stream and verifies the one it reads, so a
// lost, repeated or reordered byte is caught at the exact offset, and it
// records the longest gap between bytes arriving (the stall its side saw).
package streamcheck

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Pattern fills b with the bytes of stream dir starting at offset off. Each
// byte depends on its offset, so a lost, repeated or reordered byte shows up
// as a mismatch at the reader.
func Pattern(b []byte, dir byte, off int64) {
	for i := range b {
		x := uint64(off+int64(i)) + uint64(dir)<<40
		x ^= x >> 7
		x *= 0x9E3779B97F4A7C15
		b[i] = byte(x >> 56)
	}
}

// Endpoint streams the pattern one way and checks the other way on one
// connection. It can be paused (its goroutines stop at an exact byte
// offset) and resumed on another connection, which is how a workload moves
// with its connection.
type Endpoint struct {
	out, in byte // pattern directions written and read

	mu      sync.Mutex
	conn    *net.TCPConn
	sent    int64 // bytes written so far
	checked int64 // bytes received and verified so far
	err     error

	// Interval paces the writer: it sleeps this long between 16 KiB writes.
	Interval time.Duration

	lastRecv atomic.Int64 // unix nanoseconds of the last byte received
	maxGap   atomic.Int64 // the longest gap between received bytes, ns

	stop chan struct{}
	done sync.WaitGroup
}

// NewEndpoint returns an endpoint that writes stream out and reads stream in.
func NewEndpoint(out, in byte) *Endpoint { return &Endpoint{out: out, in: in} }

// Start begins streaming on c from the current offsets.
func (e *Endpoint) Start(c *net.TCPConn) {
	e.conn = c
	e.stop = make(chan struct{})
	c.SetDeadline(time.Time{})
	e.lastRecv.Store(time.Now().UnixNano())
	e.done.Add(2)
	go e.writer(c, e.stop)
	go e.reader(c, e.stop)
}

// Pause stops both goroutines at exact offsets and returns once they have.
// Pausing an endpoint that is not running does nothing.
func (e *Endpoint) Pause() {
	if e.stop == nil {
		return
	}
	close(e.stop)
	e.stop = nil
	e.conn.SetDeadline(time.Now())
	e.done.Wait()
}

func (e *Endpoint) fail(err error) {
	e.mu.Lock()
	if e.err == nil {
		e.err = err
	}
	e.mu.Unlock()
}

// Err returns the first error the endpoint met: a corrupt stream, or a
// read or write that failed other than by Pause.
func (e *Endpoint) Err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

func stopped(err error, stop chan struct{}) bool {
	select {
	case <-stop:
		return errors.Is(err, os.ErrDeadlineExceeded)
	default:
		return false
	}
}

func (e *Endpoint) writer(c *net.TCPConn, stop chan struct{}) {
	defer e.done.Done()
	buf := make([]byte, 16<<10)
	for {
		select {
		case <-stop:
			return
		default:
		}
		Pattern(buf, e.out, e.sent)
		n, err := c.Write(buf)
		e.sent += int64(n)
		if err != nil {
			if !stopped(err, stop) {
				e.fail(fmt.Errorf("write at offset %d: %w", e.sent, err))
			}
			return
		}
		if e.Interval > 0 { // a steady stream, not a flood; Pause ends the wait
			t := time.NewTimer(e.Interval)
			select {
			case <-stop:
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

func (e *Endpoint) reader(c *net.TCPConn, stop chan struct{}) {
	defer e.done.Done()
	buf := make([]byte, 64<<10)
	want := make([]byte, len(buf))
	for {
		n, err := c.Read(buf)
		if n > 0 {
			now := time.Now().UnixNano()
			if gap := now - e.lastRecv.Swap(now); gap > e.maxGap.Load() {
				e.maxGap.Store(gap)
			}
			Pattern(want[:n], e.in, e.checked)
			for i := 0; i < n; i++ {
				if buf[i] != want[i] {
					e.fail(fmt.Errorf("stream corrupt at offset %d", e.checked+int64(i)))
					return
				}
			}
			e.checked += int64(n)
		}
		if err != nil {
			if !stopped(err, stop) {
				e.fail(fmt.Errorf("read at offset %d: %w", e.checked, err))
			}
			return
		}
	}
}

// LastReceived returns when the endpoint last received bytes (or was
// started). It is safe to call while the endpoint runs.
func (e *Endpoint) LastReceived() time.Time { return time.Unix(0, e.lastRecv.Load()) }

// Conn returns the connection the endpoint streams on.
func (e *Endpoint) Conn() *net.TCPConn { return e.conn }

// Sent and Checked return the bytes written and verified so far; call them
// only while the endpoint is paused.
func (e *Endpoint) Sent() int64    { return e.sent }
func (e *Endpoint) Checked() int64 { return e.checked }

// MaxGap returns the longest time between two arrivals of bytes.
func (e *Endpoint) MaxGap() time.Duration { return time.Duration(e.maxGap.Load()) }

// SetOffsets sets where the streams continue, for an endpoint rebuilt from
// state carried with a migrated connection.
func (e *Endpoint) SetOffsets(sent, checked int64) { e.sent, e.checked = sent, checked }

// StateLen is the length of the state State returns.
const StateLen = 16

// State returns the endpoint's offsets as the application state a paused
// workload hands over with its connection: Sent then Checked, each eight
// bytes big-endian. Call it only while the endpoint is paused.
func (e *Endpoint) State() []byte {
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, uint64(e.sent)), uint64(e.checked))
}

// SetState sets the offsets from state made by State, for the endpoint
// that carries on with the migrated connection.
func (e *Endpoint) SetState(state []byte) error {
	if len(state) != StateLen {
		return fmt.Errorf("streamcheck: state of %d bytes, want %d", len(state), StateLen)
	}
	e.SetOffsets(int64(binary.BigEndian.Uint64(state)), int64(binary.BigEndian.Uint64(state[8:])))
	return nil
}
