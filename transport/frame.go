package transport

import (
	"encoding/binary"
	"errors"
	"io"
	"strconv"
)

// A frame is
//
//	length:u32be  type:u8  fields:length-1 bytes
//
// where length counts the type byte and the fields. A reader checks length
// against its limit for the type before reading or allocating anything.

// readHeader reads a frame header. It returns io.EOF, unwrapped, when r ends
// cleanly before the first byte, and an error matching ErrTruncated when r
// ends inside the header.
func readHeader(r io.Reader, hdr *[frameHeaderSize]byte) (size uint32, t MsgType, err error) {
	n, err := io.ReadFull(r, hdr[:])
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, 0, truncated("frame header", n, frameHeaderSize)
		}
		return 0, 0, err
	}
	size = binary.BigEndian.Uint32(hdr[:4])
	if size == 0 {
		return 0, 0, malformedf("frame of length 0")
	}
	return size, MsgType(hdr[4]), nil
}

// checkSize returns a *LimitError if a frame of the given size is over max.
func checkSize(name string, size uint32, max uint32) error {
	if size > max {
		return &LimitError{Limit: name, Value: uint64(size), Max: uint64(max)}
	}
	return nil
}

// eagerAlloc is the largest body read into a buffer allocated up front; a
// larger one (already checked against its limit) grows as bytes arrive, so
// that a length field alone cannot make the reader allocate.
const eagerAlloc = 1 << 20

// readBody reads the n bytes of a frame body. It uses scratch when it is
// large enough, else allocates.
func readBody(r io.Reader, n int, scratch []byte) ([]byte, error) {
	if n <= cap(scratch) {
		b := scratch[:n]
		got, err := io.ReadFull(r, b)
		return b, bodyErr(err, got, n)
	}
	if n <= eagerAlloc {
		b := make([]byte, n)
		got, err := io.ReadFull(r, b)
		return b, bodyErr(err, got, n)
	}
	b := make([]byte, 0, eagerAlloc)
	for len(b) < n {
		if len(b) == cap(b) {
			nb := make([]byte, len(b), min(2*cap(b), n))
			copy(nb, b)
			b = nb
		}
		got, err := io.ReadFull(r, b[len(b):cap(b)])
		b = b[:len(b)+got]
		if err != nil {
			return nil, bodyErr(err, len(b), n)
		}
	}
	return b, nil
}

func bodyErr(err error, got, want int) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return truncated("frame body", got, want)
	}
	return err
}

func truncated(what string, got, want int) error {
	return &truncatedError{what: what, got: got, want: want}
}

type truncatedError struct {
	what      string
	got, want int
}

func (e *truncatedError) Error() string {
	return "stream ended early: " + e.what + " cut after " + itoa(e.got) + " of " + itoa(e.want) + " bytes"
}

func (e *truncatedError) Is(target error) bool { return target == ErrTruncated }

// readMessage reads one frame of phase p from r and decodes it, skipping
// ancillary frames it does not know. max bounds the frame length; name is
// the limit's name in errors. scratch may be reused for the body: messages
// copy what they keep.
func readMessage(r io.Reader, p phase, max uint32, name string, scratch []byte) (Message, error) {
	var hdr [frameHeaderSize]byte
	for {
		size, t, err := readHeader(r, &hdr)
		if err != nil {
			return nil, err
		}
		if err := checkSize(name, size, max); err != nil {
			return nil, err
		}
		body, err := readBody(r, int(size-1), scratch)
		if err != nil {
			return nil, err
		}
		m, err := decodeMessage(p, t, body)
		if err == errSkip {
			continue
		}
		return m, err
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
