package transport

import (
	"strconv"
	"time"
)

// Wire constants. Every value in this file is part of the protocol written
// down in docs/protocol.md; const_test.go pins each one, so changing a value
// here without changing the document and the test fails the build.

// Magic is the four bytes that open the preamble each side sends first. Its
// first byte is not a TLS record type (0x14-0x18), so a TLS endpoint and a
// plaintext endpoint can tell each other apart from the first bytes.
var Magic = [4]byte{'T', 'M', 'I', 'G'}

// Protocol versions. A side speaks every version from its minimum to its
// maximum; the link runs at the highest version both speak.
const (
	// ProtocolVersion is the version this package speaks. Version 2 adds
	// READY and PREPARE's tuples (docs/protocol.md §9); version 3 adds
	// pre-copies, a snapshot record's pass (tag 20).
	ProtocolVersion uint16 = 3
	// MinProtocolVersion is the oldest version this package still speaks.
	MinProtocolVersion uint16 = 1
)

// Sizes fixed by the protocol.
const (
	// preambleSize is the size of the preamble: magic, minimum version,
	// maximum version.
	preambleSize = 8
	// frameHeaderSize is the size of a frame header: a 32-bit length and
	// the message type.
	frameHeaderSize = 5
	// HandshakeMaxFrame bounds the frames of the handshake (Hello, Accept,
	// Reject), which are read before any limit has been exchanged.
	HandshakeMaxFrame = 64 << 10
	// MaxChunk bounds a chunk of a snapshot stream's body, as sent and as
	// decoded: the zstd decoder of a stream never holds more.
	MaxChunk = 128 << 10
)

// MsgType is the type byte of a frame. Types 0x80 to 0xFF are ancillary: a
// receiver that does not know one skips the frame. An unknown type below 0x80
// is a protocol error.
type MsgType uint8

// The message types. The values are wire values.
const (
	// Handshake messages, sent on the raw connection before yamux starts.
	MsgHello  MsgType = 0x01 // capabilities and limits of the sender
	MsgAccept MsgType = 0x02 // the sender accepts the peer's Hello
	MsgReject MsgType = 0x03 // the sender refuses the handshake: code and reason

	// MsgStreamOpen is the first frame of every yamux stream: its kind and codec.
	MsgStreamOpen MsgType = 0x04

	// Control messages of the two-phase handoff, on the control stream.
	MsgPrepare   MsgType = 0x10 // source: a migration of N connections begins
	MsgVerdicts  MsgType = 0x11 // target: a batch of per-connection verdicts
	MsgPrepared  MsgType = 0x12 // target: every verdict has been sent
	MsgSwitch    MsgType = 0x13 // source: the network identity moves now
	MsgSwitched  MsgType = 0x14 // target: the network identity has moved
	MsgCommit    MsgType = 0x15 // source: commit every prepared connection
	MsgCommitted MsgType = 0x16 // target: the commit is done and recorded
	MsgAbort     MsgType = 0x17 // either side: roll the migration back
	MsgQuery     MsgType = 0x18 // source: what became of a migration?
	MsgOutcome   MsgType = 0x19 // target: the recorded outcome of a migration

	MsgListeners      MsgType = 0x1a // source: listening sockets to recreate, with their pending connections
	MsgListenersReady MsgType = 0x1b // target: a verdict per listener
	MsgReady          MsgType = 0x1c // target: ready for the source's lock (version 2)
	MsgPrecopied      MsgType = 0x1d // source: this many pre-copies were written (version 3)
	MsgPrecopyDone    MsgType = 0x1e // target: that many pre-copies are restored (version 3)

	// Records of a snapshot stream, inside its (compressed) body.
	MsgSnapshot MsgType = 0x20 // one connection's snapshot and its index
	MsgEnd      MsgType = 0x21 // the end of a snapshot stream and its record count

	// msgAncillary is the first ancillary type.
	msgAncillary MsgType = 0x80
)

// String returns the message type's name, such as "PREPARE".
func (t MsgType) String() string {
	if int(t) < len(msgTable) && msgTable[t].name != "" {
		return msgTable[t].name
	}
	return "MSG(0x" + strconv.FormatUint(uint64(t), 16) + ")"
}

// StreamKind says what a yamux stream carries; it is the first field of its
// StreamOpen frame.
type StreamKind uint8

// The stream kinds.
const (
	StreamControl   StreamKind = 1 // the control stream: handoff messages
	StreamSnapshots StreamKind = 2 // a snapshot stream: Snapshot records, then End
)

// Codec is the compression of a snapshot stream's body.
type Codec uint8

// The codecs. CodecNone is always accepted.
const (
	CodecNone Codec = 0 // the body is sent as it is
	CodecZstd Codec = 1 // the body is one zstd stream
)

// String returns the codec's name: "none" or "zstd".
func (c Codec) String() string {
	switch c {
	case CodecNone:
		return "none"
	case CodecZstd:
		return "zstd"
	}
	return "codec(" + strconv.Itoa(int(c)) + ")"
}

// RejectCode says why a side refused the handshake.
type RejectCode uint8

// The reject codes.
const (
	RejectVersion     RejectCode = 1 // no protocol version in common
	RejectFeature     RejectCode = 2 // the peer lacks a kernel feature this side requires
	RejectTLSRequired RejectCode = 3 // this side requires TLS and the peer spoke plaintext
	RejectPlaintext   RejectCode = 4 // this side is insecure (plaintext) and the peer spoke TLS
	RejectMalformed   RejectCode = 5 // the peer's handshake could not be parsed
	RejectPolicy      RejectCode = 6 // refused by local policy (the reason says which)
)

var rejectNames = [...]string{
	RejectVersion:     "version",
	RejectFeature:     "missing-feature",
	RejectTLSRequired: "tls-required",
	RejectPlaintext:   "plaintext-only",
	RejectMalformed:   "malformed",
	RejectPolicy:      "policy",
}

// String returns the code's stable short name, such as "version".
func (c RejectCode) String() string {
	if int(c) < len(rejectNames) && rejectNames[c] != "" {
		return rejectNames[c]
	}
	return "reject(" + strconv.Itoa(int(c)) + ")"
}

// VerdictCode is the outcome of one connection in a Verdicts, Committed or
// Outcome message.
type VerdictCode uint8

// The verdict codes. Zero is not a verdict: a Verdict without a code is
// malformed. A receiver treats a code it does not know as a failure.
const (
	VerdictOK          VerdictCode = 1 // prepared (or, after commit, delivered)
	VerdictRefused     VerdictCode = 2 // refused by the target's policy (allow-list, limits)
	VerdictFailed      VerdictCode = 3 // restoring or delivering the socket failed
	VerdictLimit       VerdictCode = 4 // a size or count limit was exceeded
	VerdictInvalid     VerdictCode = 5 // the snapshot was invalid or could not be decoded
	VerdictConflict    VerdictCode = 6 // the 4-tuple is in use or could not be locked
	VerdictUnsupported VerdictCode = 7 // the target cannot restore this kind of connection
)

var verdictNames = [...]string{
	VerdictOK:          "ok",
	VerdictRefused:     "refused",
	VerdictFailed:      "failed",
	VerdictLimit:       "limit",
	VerdictInvalid:     "invalid",
	VerdictConflict:    "conflict",
	VerdictUnsupported: "unsupported",
}

// String returns the code's stable short name, such as "ok".
func (c VerdictCode) String() string {
	if int(c) < len(verdictNames) && verdictNames[c] != "" {
		return verdictNames[c]
	}
	return "verdict(" + strconv.Itoa(int(c)) + ")"
}

// AbortCode says why a migration is aborted.
type AbortCode uint8

// The abort codes.
const (
	AbortError    AbortCode = 1 // a step failed; the reason says which
	AbortTimeout  AbortCode = 2 // a step took too long
	AbortCanceled AbortCode = 3 // the operator or the caller canceled
	AbortPolicy   AbortCode = 4 // the migration as a whole was refused
)

var abortNames = [...]string{
	AbortError:    "error",
	AbortTimeout:  "timeout",
	AbortCanceled: "canceled",
	AbortPolicy:   "policy",
}

// String returns the code's stable short name, such as "timeout".
func (c AbortCode) String() string {
	if int(c) < len(abortNames) && abortNames[c] != "" {
		return abortNames[c]
	}
	return "abort(" + strconv.Itoa(int(c)) + ")"
}

// MigrationState is what the target remembers of a migration, as an Outcome
// message reports it.
type MigrationState uint8

// The migration states.
const (
	StateUnknown   MigrationState = 1 // the target has no record of the migration
	StatePreparing MigrationState = 2 // prepared, neither committed nor aborted yet
	StateCommitted MigrationState = 3 // committed: the target owns the connections
	StateAborted   MigrationState = 4 // aborted: the source owns the connections
)

var stateNames = [...]string{
	StateUnknown:   "unknown",
	StatePreparing: "preparing",
	StateCommitted: "committed",
	StateAborted:   "aborted",
}

// String returns the state's stable short name, such as "committed".
func (s MigrationState) String() string {
	if int(s) < len(stateNames) && stateNames[s] != "" {
		return stateNames[s]
	}
	return "state(" + strconv.Itoa(int(s)) + ")"
}

// Default limits and timeouts (see Limits and Config).
const (
	DefaultMaxFrame          = 1 << 20  // 1 MiB
	DefaultMaxSnapshot       = 64 << 20 // 64 MiB
	DefaultMaxMigration      = 4 << 30  // 4 GiB
	DefaultMaxConnections    = 1 << 20  // 1,048,576
	DefaultHandshakeTimeout  = 10 * time.Second
	DefaultKeepAliveInterval = 1 * time.Second
	DefaultKeepAliveTimeout  = 4 * time.Second
)
