package transport

import (
	"encoding/binary"
	"sync"
)

// yamux's frame header, as its send loop writes it (hashicorp/yamux
// const.go and spec.md): version (0), type, flags, stream ID, length, 12
// bytes in all; a data frame (type 0) is followed by a body of length bytes.
const (
	yamuxHeaderLen = 12
	yamuxVersion   = 0
	yamuxTypeData  = 0
)

// maxCoalesce is the longest body whose header coalesceConn holds back: a
// frame up to it fits in one TLS record (16 KiB of plaintext). A longer body
// is several records anyway, and copying it would cost more than the
// header's record saves.
const maxCoalesce = 16<<10 - yamuxHeaderLen

// coalesceConn is the connection under yamux. yamux's send loop, the only
// writer of a session's connection, writes each frame in two calls: its
// header, then its body, if any. Over TLS each call becomes a record of its
// own, a write system call of its own (which on a local path also carries the
// segment through the receiver's stack) and usually a wake-up of the peer's
// reader of its own: two of each for every control message and every
// flushed chunk. coalesceConn holds back the header of a data frame whose
// body is short and writes it together with the body, in one call and so one
// record. Every other write (a frame without a body: window updates, pings,
// a stream's SYN or FIN; a long body) passes straight through, so nothing is
// ever held once a frame is complete.
//
// The byte stream is unchanged: a peer sees the same frames either way.
// Write is safe for concurrent use, but only one goroutine writes (yamux's
// send loop), and a held header must be followed by its body.
type coalesceConn struct {
	*watchConn

	mu   sync.Mutex // guards hdr, held and buf
	hdr  [yamuxHeaderLen]byte
	held bool   // hdr is a data frame's header waiting for its body
	buf  []byte // the header and body of the frame being written
}

// Write writes p, or holds it back when it is the header of a data frame
// with a short body (see coalesceConn).
func (c *coalesceConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held {
		c.held = false
		c.buf = append(append(c.buf[:0], c.hdr[:]...), p...)
		n, err := c.watchConn.Write(c.buf)
		return max(0, n-yamuxHeaderLen), err
	}
	if len(p) == yamuxHeaderLen && p[0] == yamuxVersion && p[1] == yamuxTypeData {
		if n := binary.BigEndian.Uint32(p[8:]); n > 0 && n <= maxCoalesce {
			copy(c.hdr[:], p)
			c.held = true
			return len(p), nil
		}
	}
	return c.watchConn.Write(p)
}
