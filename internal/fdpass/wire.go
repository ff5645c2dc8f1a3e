package fdpass

import (
	"encoding/binary"
	"fmt"
	"math"
	"net/netip"
	"strings"
	"unicode"

	"github.com/tcpmigrate/tcpmigrate/internal/activation"
)

// Wire constants. TestWireConstants pins each of them: changing one changes
// the protocol and needs a new Version. docs/handoff-socket.md lays them out.
const (
	// Magic opens every frame.
	Magic = "TMFD"
	// Version is the protocol version this package speaks.
	Version = 1
	// HeaderLen is the length of the fixed frame header.
	HeaderLen = 12
	// MaxFDsPerFrame is the most descriptors one frame carries: the kernel's
	// SCM_MAX_FD. Larger batches are split across frames.
	MaxFDsPerFrame = 253
	// MaxBodyLen is the largest frame body of any type.
	MaxBodyLen = 4 << 20
	// MaxStateLen is the largest application-state blob the protocol carries
	// with one socket.
	MaxStateLen = 1 << 20
	// MaxBatchLimit is the most sockets (or IDs) one message may carry.
	MaxBatchLimit = 1 << 16

	helloLen        = 12   // the hello body this version writes
	maxHelloBody    = 1024 // a longer hello from a newer minor revision is read, its tail ignored
	errorFixedLen   = 2    // the code
	maxErrorBody    = 4096 // code and message
	batchHeaderLen  = 4    // count, flags, reserved
	idListFixedLen  = 4    // count
	maxIDListBody   = idListFixedLen + 8*MaxBatchLimit
	flagFinal       = 0x01          // batch flag: the last frame of the batch
	flagLive        = 0x02          // batch flag (KindSockets): the sender serves the sockets until KindPause
	familyNone      = 0             // address family byte: no address
	family4         = 4             // IPv4: 4 address bytes
	family6         = 6             // IPv6: 16 address bytes and a zone
	recordFixedLen  = 8 + 1 + 1 + 4 // ID, two empty addresses, state length
	maxErrorMessage = maxErrorBody - errorFixedLen
)

// Kind is the message type of a frame. The values are wire constants.
type Kind uint8

// The message types.
const (
	// KindHello opens each direction of a connection with the sender's
	// receive limits. The listener sends it on accept, the dialer after
	// reading it.
	KindHello Kind = iota + 1
	// KindError ends a connection with an ErrorCode and a message. Its layout
	// is the same in every protocol version.
	KindError
	// KindSockets carries sockets: from an application to the source agent
	// (handoff), or from the target agent to an application (delivery).
	KindSockets
	// KindHandBack carries sockets the source agent returns to the
	// application because their migration rolled back.
	KindHandBack
	// KindCommitted lists the IDs of sockets whose migration committed: the
	// application must forget them.
	KindCommitted
	// KindAck lists the IDs of sockets the receiver has taken over.
	KindAck
	// KindPause lists the IDs of sockets handed over live (Message.Live)
	// that the source agent is about to lock: their sender must stop using
	// them (keeping its descriptors) and answer KindPaused.
	KindPause
	// KindPaused answers KindPause: one record per paused socket (its ID
	// and the application's state as of the pause), without descriptors;
	// the sender no longer touches those sockets.
	KindPaused
)

var kindInfo = [...]struct {
	name             string
	minBody, maxBody int
	fds              bool
}{
	KindHello:     {"hello", helloLen, maxHelloBody, false},
	KindError:     {"error", errorFixedLen, maxErrorBody, false},
	KindSockets:   {"sockets", batchHeaderLen, MaxBodyLen, true},
	KindHandBack:  {"hand-back", batchHeaderLen, MaxBodyLen, true},
	KindCommitted: {"committed", idListFixedLen, maxIDListBody, false},
	KindAck:       {"ack", idListFixedLen, maxIDListBody, false},
	KindPause:     {"pause", idListFixedLen, maxIDListBody, false},
	KindPaused:    {"paused", batchHeaderLen, MaxBodyLen, false},
}

func (k Kind) valid() bool { return k >= KindHello && int(k) < len(kindInfo) }

// String returns the type's stable short name.
func (k Kind) String() string {
	if k.valid() {
		return kindInfo[k].name
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Limits bound what one side accepts. Each side sends its limits in its
// hello, and a sender checks a message against the peer's limits before
// writing a byte of it. A zero field takes its default.
type Limits struct {
	// MaxState is the largest state blob accepted with one socket. Default
	// DefaultMaxState; at most MaxStateLen.
	MaxState int
	// MaxBatch is the most sockets accepted in one message, and the most IDs
	// in one list. Default DefaultMaxBatch; at most MaxBatchLimit.
	MaxBatch int
	// MaxBatchBytes is the most state bytes accepted in one message, over
	// all its sockets. Default DefaultMaxBatchBytes; at most 4 GiB - 1.
	MaxBatchBytes int
}

// The default limits.
const (
	DefaultMaxState      = 1 << 20
	DefaultMaxBatch      = 4096
	DefaultMaxBatchBytes = 64 << 20
)

// resolve applies the defaults and the protocol's ceilings.
func (l Limits) resolve() Limits {
	def := func(v, d, max int) int {
		if v <= 0 {
			v = d
		}
		return min(v, max)
	}
	return Limits{
		MaxState:      def(l.MaxState, DefaultMaxState, MaxStateLen),
		MaxBatch:      def(l.MaxBatch, DefaultMaxBatch, MaxBatchLimit),
		MaxBatchBytes: def(l.MaxBatchBytes, DefaultMaxBatchBytes, math.MaxUint32),
	}
}

// header is the fixed part of a frame.
type header struct {
	version uint8
	kind    Kind
	nfds    int
	bodyLen int
}

func appendHeader(b []byte, k Kind, nfds, bodyLen int) []byte {
	b = append(b, Magic...)
	b = append(b, Version, byte(k))
	b = binary.BigEndian.AppendUint16(b, uint16(nfds))
	return binary.BigEndian.AppendUint32(b, uint32(bodyLen))
}

// parseHeader checks a header in the order documented in
// docs/handoff-socket.md; nothing is allocated for a body it refuses.
func parseHeader(b []byte) (header, error) {
	if len(b) < HeaderLen {
		return header{}, fmt.Errorf("%w: %d-byte header, want %d", ErrMalformed, len(b), HeaderLen)
	}
	if string(b[:4]) != Magic {
		return header{}, fmt.Errorf("%w: bad magic %q (is the peer a tcpmigrate handoff socket?)", ErrMalformed, b[:4])
	}
	h := header{
		version: b[4],
		kind:    Kind(b[5]),
		nfds:    int(binary.BigEndian.Uint16(b[6:8])),
		bodyLen: int(binary.BigEndian.Uint32(b[8:12])),
	}
	// An error frame is read whatever its version, so that a peer can say
	// that it does not speak ours.
	if h.version != Version && h.kind != KindError {
		return h, fmt.Errorf("%w: peer speaks version %d, this side speaks version %d", ErrVersion, h.version, Version)
	}
	if !h.kind.valid() {
		return h, fmt.Errorf("%w: unknown message type %d", ErrMalformed, b[5])
	}
	info := kindInfo[h.kind]
	if h.nfds > MaxFDsPerFrame {
		return h, fmt.Errorf("%w: %s frame claims %d descriptors, at most %d fit in one frame", ErrMalformed, h.kind, h.nfds, MaxFDsPerFrame)
	}
	if h.nfds != 0 && !info.fds {
		return h, fmt.Errorf("%w: %s frame claims %d descriptors, it carries none", ErrMalformed, h.kind, h.nfds)
	}
	if h.bodyLen > info.maxBody {
		return h, fmt.Errorf("%w: %s frame body of %d bytes, at most %d allowed", ErrTooLarge, h.kind, h.bodyLen, info.maxBody)
	}
	if h.bodyLen < info.minBody {
		return h, fmt.Errorf("%w: %s frame body of %d bytes, at least %d needed", ErrMalformed, h.kind, h.bodyLen, info.minBody)
	}
	return h, nil
}

// frame is one decoded frame; which fields are set depends on kind. The
// items of a socket frame have no File yet: the caller attaches the
// descriptors that arrived with the frame.
type frame struct {
	kind   Kind
	nfds   int
	final  bool      // KindSockets, KindHandBack, KindPaused: the last frame of the batch
	live   bool      // KindSockets: handed over live (flagLive)
	limits Limits    // KindHello
	code   ErrorCode // KindError
	msg    string    // KindError
	items  []Item    // KindSockets, KindHandBack, KindPaused (no File)
	ids    []uint64  // KindCommitted, KindAck, KindPause
}

// decodeFrame decodes one whole frame, header and body, received without
// descriptors. It is the entry point of the fuzz target; the connection
// reads the header first and calls decodeBody.
func decodeFrame(b []byte, lim Limits) (frame, error) {
	h, err := parseHeader(b)
	if err != nil {
		return frame{}, err
	}
	if got := len(b) - HeaderLen; got != h.bodyLen {
		return frame{}, fmt.Errorf("%w: %s frame body is %d bytes, header says %d", ErrMalformed, h.kind, got, h.bodyLen)
	}
	return decodeBody(h, b[HeaderLen:], lim.resolve())
}

// decodeBody decodes the body of a frame whose header passed parseHeader.
// lim must be resolved.
func decodeBody(h header, body []byte, lim Limits) (frame, error) {
	f := frame{kind: h.kind, nfds: h.nfds}
	var err error
	switch h.kind {
	case KindHello:
		f.limits = Limits{
			MaxState:      min(int(binary.BigEndian.Uint32(body[0:4])), MaxStateLen),
			MaxBatch:      min(int(binary.BigEndian.Uint32(body[4:8])), MaxBatchLimit),
			MaxBatchBytes: int(binary.BigEndian.Uint32(body[8:12])),
		}
		// Bytes after the known fields belong to a later revision: ignored.
	case KindError:
		f.code = ErrorCode(binary.BigEndian.Uint16(body[0:2]))
		f.msg = sanitize(string(body[2:]))
	case KindSockets, KindHandBack, KindPaused:
		err = decodeBatch(&f, h, body, lim)
	case KindCommitted, KindAck, KindPause:
		err = decodeIDs(&f, h, body, lim)
	}
	return f, err
}

// sanitize makes a peer's message safe to print: invalid UTF-8 and
// non-printable characters become '?'.
func sanitize(s string) string {
	s = strings.ToValidUTF8(s, "?")
	return strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return '?'
	}, s)
}

func decodeIDs(f *frame, h header, body []byte, lim Limits) error {
	n := binary.BigEndian.Uint32(body[0:4])
	if int64(n) > int64(lim.MaxBatch) {
		return fmt.Errorf("%w: %s list of %d IDs, at most %d accepted", ErrTooLarge, h.kind, n, lim.MaxBatch)
	}
	if want := idListFixedLen + 8*int(n); len(body) != want {
		return fmt.Errorf("%w: %s list of %d IDs needs a %d-byte body, got %d", ErrMalformed, h.kind, n, want, len(body))
	}
	f.ids = make([]uint64, n)
	for i := range f.ids {
		f.ids[i] = binary.BigEndian.Uint64(body[idListFixedLen+8*i:])
	}
	return nil
}

func decodeBatch(f *frame, h header, body []byte, lim Limits) error {
	count := int(binary.BigEndian.Uint16(body[0:2]))
	flags, reserved := body[2], body[3]
	// A PAUSED record names a socket the receiver holds: no descriptor
	// travels with it (parseHeader saw to nfds), and count alone says how
	// many there are, within the frame's bounds.
	if kindInfo[h.kind].fds && count != h.nfds {
		return fmt.Errorf("%w: %s frame names %d sockets but its header claims %d descriptors", ErrMalformed, h.kind, count, h.nfds)
	}
	known := byte(flagFinal)
	if h.kind == KindSockets {
		known |= flagLive
	}
	if flags&^known != 0 || reserved != 0 {
		return fmt.Errorf("%w: %s frame has unknown flags %#02x/%#02x", ErrMalformed, h.kind, flags, reserved)
	}
	if count > lim.MaxBatch {
		return fmt.Errorf("%w: %s frame of %d sockets, at most %d accepted", ErrTooLarge, h.kind, count, lim.MaxBatch)
	}
	// Frames are split at MaxFDsPerFrame records whether or not they carry
	// descriptors (parseHeader bounds nfds), and the records must fit in
	// the body.
	if count > MaxFDsPerFrame {
		return fmt.Errorf("%w: %s frame of %d records, at most %d in one frame", ErrMalformed, h.kind, count, MaxFDsPerFrame)
	}
	if most := (len(body) - batchHeaderLen) / (4 + recordFixedLen); count > most {
		return fmt.Errorf("%w: %s frame of %d sockets in %d bytes, room for at most %d records", ErrMalformed, h.kind, count, len(body), most)
	}
	f.final, f.live = flags&flagFinal != 0, flags&flagLive != 0
	f.items = make([]Item, 0, count) // count ≤ MaxFDsPerFrame, and records for each are in body
	p := body[batchHeaderLen:]
	for i := 0; i < count; i++ {
		if len(p) < 4 {
			return fmt.Errorf("%w: %s frame ends before socket %d of %d", ErrMalformed, h.kind, i, count)
		}
		n := binary.BigEndian.Uint32(p)
		p = p[4:]
		if int64(n) > int64(len(p)) {
			return fmt.Errorf("%w: socket %d record claims %d bytes, %d left in the frame", ErrMalformed, i, n, len(p))
		}
		it, err := decodeRecord(p[:n], lim, i)
		if err != nil {
			return err
		}
		f.items = append(f.items, it)
		p = p[n:]
	}
	if len(p) != 0 {
		return fmt.Errorf("%w: %d bytes after the last socket of a %s frame", ErrMalformed, len(p), h.kind)
	}
	return nil
}

// decodeRecord decodes the record of the i-th socket of a frame; bytes after
// the known fields belong to a later revision and are ignored.
func decodeRecord(r []byte, lim Limits, i int) (Item, error) {
	var it Item
	if len(r) < recordFixedLen {
		return it, fmt.Errorf("%w: socket %d: %d-byte record, at least %d needed", ErrMalformed, i, len(r), recordFixedLen)
	}
	it.ID = binary.BigEndian.Uint64(r)
	r = r[8:]
	var err error
	if it.Local, r, err = decodeAddr(r, i, "local"); err != nil {
		return it, err
	}
	if it.Remote, r, err = decodeAddr(r, i, "remote"); err != nil {
		return it, err
	}
	if len(r) < 4 {
		return it, fmt.Errorf("%w: socket %d: record ends before the state length", ErrMalformed, i)
	}
	n := binary.BigEndian.Uint32(r)
	r = r[4:]
	if int64(n) > int64(lim.MaxState) {
		return it, fmt.Errorf("%w: socket %d: state blob of %d bytes, at most %d accepted", ErrTooLarge, i, n, lim.MaxState)
	}
	if int64(n) > int64(len(r)) {
		return it, fmt.Errorf("%w: socket %d: state blob of %d bytes, %d left in the record", ErrMalformed, i, n, len(r))
	}
	if n > 0 {
		it.State = append([]byte(nil), r[:n]...)
	}
	r = r[n:]
	// Optional: a name, one length byte and the bytes.
	if len(r) > 0 && r[0] > 0 {
		l := int(r[0])
		if len(r) < 1+l || !activation.ValidName(string(r[1:1+l])) {
			return it, fmt.Errorf("%w: socket %d: bad name field", ErrMalformed, i)
		}
		it.Name = string(r[1 : 1+l])
	}
	return it, nil
}

// decodeAddr decodes the local or remote address of the i-th socket.
func decodeAddr(r []byte, i int, which string) (netip.AddrPort, []byte, error) {
	if len(r) < 1 {
		return netip.AddrPort{}, r, fmt.Errorf("%w: socket %d: record ends before the %s address", ErrMalformed, i, which)
	}
	switch r[0] {
	case familyNone:
		return netip.AddrPort{}, r[1:], nil
	case family4:
		if len(r) < 1+4+2 {
			return netip.AddrPort{}, r, fmt.Errorf("%w: socket %d: record ends inside the %s IPv4 address", ErrMalformed, i, which)
		}
		a := netip.AddrFrom4([4]byte(r[1:5]))
		return netip.AddrPortFrom(a, binary.BigEndian.Uint16(r[5:7])), r[7:], nil
	case family6:
		if len(r) < 1+16+2+1 {
			return netip.AddrPort{}, r, fmt.Errorf("%w: socket %d: record ends inside the %s IPv6 address", ErrMalformed, i, which)
		}
		a := netip.AddrFrom16([16]byte(r[1:17]))
		port := binary.BigEndian.Uint16(r[17:19])
		zl := int(r[19])
		r = r[20:]
		if zl > len(r) {
			return netip.AddrPort{}, r, fmt.Errorf("%w: socket %d: record ends inside the %s IPv6 zone", ErrMalformed, i, which)
		}
		if zl > 0 {
			a = a.WithZone(string(r[:zl]))
		}
		return netip.AddrPortFrom(a, port), r[zl:], nil
	default:
		return netip.AddrPort{}, r, fmt.Errorf("%w: socket %d: unknown %s address family %d", ErrMalformed, i, which, r[0])
	}
}

// addrLen is the encoded length of an address.
func addrLen(ap netip.AddrPort) int {
	switch a := ap.Addr(); {
	case !ap.IsValid():
		return 1
	case a.Is4():
		return 1 + 4 + 2
	default:
		return 1 + 16 + 2 + 1 + len(a.Zone())
	}
}

func appendAddr(b []byte, ap netip.AddrPort) []byte {
	a := ap.Addr()
	switch {
	case !ap.IsValid():
		return append(b, familyNone)
	case a.Is4():
		b = append(b, family4)
		b = append(b, a.AsSlice()...)
		return binary.BigEndian.AppendUint16(b, ap.Port())
	default:
		b = append(b, family6)
		a16 := a.As16()
		b = append(b, a16[:]...)
		b = binary.BigEndian.AppendUint16(b, ap.Port())
		b = append(b, byte(len(a.Zone())))
		return append(b, a.Zone()...)
	}
}

// recordLen is the encoded length of an item's record, without its length
// prefix.
func recordLen(it *Item) int {
	n := 8 + addrLen(it.Local) + addrLen(it.Remote) + 4 + len(it.State)
	if it.Name != "" {
		n += 1 + len(it.Name)
	}
	return n
}

// span is a run of items that go in one frame.
type span struct{ start, end, bodyLen int }

// planBatch splits items into frames of at most MaxFDsPerFrame sockets and
// MaxBodyLen bytes. An empty batch is one empty frame. Every item must have
// passed checkItem, so one item always fits in a frame.
func planBatch(items []Item) []span {
	spans := []span{{bodyLen: batchHeaderLen}}
	for i := range items {
		n := 4 + recordLen(&items[i])
		cur := &spans[len(spans)-1]
		if cur.end-cur.start == MaxFDsPerFrame || cur.bodyLen+n > MaxBodyLen {
			spans = append(spans, span{start: i, end: i, bodyLen: batchHeaderLen})
			cur = &spans[len(spans)-1]
		}
		cur.end++
		cur.bodyLen += n
	}
	return spans
}

// appendBatchFrame encodes the frame of the items of one span.
func appendBatchFrame(b []byte, k Kind, items []Item, s span, final bool) []byte {
	return appendBatchFrameFlags(b, k, items, s, final, false)
}

// appendBatchFrameFlags is appendBatchFrame with the live flag (KindSockets
// only).
func appendBatchFrameFlags(b []byte, k Kind, items []Item, s span, final, live bool) []byte {
	n := s.end - s.start
	nfds := n
	if !kindInfo[k].fds {
		nfds = 0 // KindPaused: records of sockets the receiver holds
	}
	b = appendHeader(b, k, nfds, s.bodyLen)
	b = binary.BigEndian.AppendUint16(b, uint16(n))
	var flags byte
	if final {
		flags |= flagFinal
	}
	if live {
		flags |= flagLive
	}
	b = append(b, flags, 0)
	for i := s.start; i < s.end; i++ {
		it := &items[i]
		b = binary.BigEndian.AppendUint32(b, uint32(recordLen(it)))
		b = binary.BigEndian.AppendUint64(b, it.ID)
		b = appendAddr(b, it.Local)
		b = appendAddr(b, it.Remote)
		b = binary.BigEndian.AppendUint32(b, uint32(len(it.State)))
		b = append(b, it.State...)
		if it.Name != "" { // checkItem: 1 to activation.MaxNameLen (255) bytes, one length byte
			b = append(b, byte(len(it.Name)))
			b = append(b, it.Name...)
		}
	}
	return b
}

func appendHello(b []byte, l Limits) []byte {
	b = appendHeader(b, KindHello, 0, helloLen)
	b = binary.BigEndian.AppendUint32(b, uint32(l.MaxState))
	b = binary.BigEndian.AppendUint32(b, uint32(l.MaxBatch))
	return binary.BigEndian.AppendUint32(b, uint32(l.MaxBatchBytes))
}

func appendError(b []byte, code ErrorCode, msg string) []byte {
	msg = truncateUTF8(msg, maxErrorMessage)
	b = appendHeader(b, KindError, 0, errorFixedLen+len(msg))
	b = binary.BigEndian.AppendUint16(b, uint16(code))
	return append(b, msg...)
}

// truncateUTF8 cuts s to at most n bytes without splitting a character.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	for i := 0; i < 3 && len(s) > 0; i++ {
		if strings.ToValidUTF8(s, "") == s {
			break
		}
		s = s[:len(s)-1]
	}
	return s
}

func appendIDs(b []byte, k Kind, ids []uint64) []byte {
	b = appendHeader(b, k, 0, idListFixedLen+8*len(ids))
	b = binary.BigEndian.AppendUint32(b, uint32(len(ids)))
	for _, id := range ids {
		b = binary.BigEndian.AppendUint64(b, id)
	}
	return b
}
