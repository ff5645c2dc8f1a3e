package transport

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"time"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// Message is one typed message of the protocol: a handshake message (Hello,
// Accept, Reject) or a control message of the two-phase handoff. The set is
// closed: only the types of this package implement it.
type Message interface {
	// Type returns the message's wire type.
	Type() MsgType
	appendFields(b []byte) []byte
	decodeFields(b []byte) error
}

// MigrationID identifies one migration. The source draws it at random; the
// target records outcomes under it, so that an in-doubt source can ask.
type MigrationID [16]byte

// NewMigrationID returns a random MigrationID.
func NewMigrationID() MigrationID {
	var id MigrationID
	_, _ = rand.Read(id[:]) // crypto/rand.Read does not fail (Go 1.24+)
	return id
}

// String returns the ID as 32 hexadecimal digits.
func (id MigrationID) String() string { return hex.EncodeToString(id[:]) }

// ParseMigrationID parses the 32 hexadecimal digits String returns.
func ParseMigrationID(s string) (MigrationID, error) {
	var id MigrationID
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(id) {
		return id, fmt.Errorf("transport: parse migration id %q: want 32 hexadecimal digits", s)
	}
	copy(id[:], b)
	return id, nil
}

// Verdict is the outcome of one connection: its index in the migration, a
// code, and a human-readable reason (empty for VerdictOK).
type Verdict struct {
	// Index is the connection's index in the migration.
	Index uint32
	// Code is the outcome; a receiver treats a code it does not know as a
	// failure.
	Code VerdictCode
	// Reason says why, for reports; empty when Code is VerdictOK.
	Reason string
}

// OK reports whether the verdict is VerdictOK.
func (v Verdict) OK() bool { return v.Code == VerdictOK }

var verdictTable = newTable("verdict",
	uintField(1, "index", func(v *Verdict) *uint32 { return &v.Index }),
	uintField(2, "code", func(v *Verdict) *VerdictCode { return &v.Code }),
	stringField(3, "reason", func(v *Verdict) *string { return &v.Reason }),
)

// Hello is what each side says of itself in the handshake: its kernel's
// repair features, the codecs it accepts and the limits it enforces on what
// it receives. A sender respects the peer's limits.
type Hello struct {
	// Features are the kernel features of the sender (repair.Probe).
	Features repair.Features
	// Kernel is the sender's kernel release.
	Kernel string
	// Congestion lists the congestion-control algorithms the sender has.
	Congestion []string
	// Codecs is the set of codecs the sender accepts, one bit per Codec
	// (bit 0: none, bit 1: zstd).
	Codecs uint32
	// Limits are the sender's receive limits.
	Limits Limits
	// Software names the sender's program and version, for reports.
	Software string
}

var helloTable = newTable("hello",
	uintField(1, "features", func(m *Hello) *repair.Features { return &m.Features }),
	stringField(2, "kernel", func(m *Hello) *string { return &m.Kernel }),
	stringsField(3, "congestion", func(m *Hello) *[]string { return &m.Congestion }),
	uintField(4, "codecs", func(m *Hello) *uint32 { return &m.Codecs }),
	uintField(5, "max_frame", func(m *Hello) *uint32 { return &m.Limits.MaxFrame }),
	uintField(6, "max_snapshot", func(m *Hello) *uint32 { return &m.Limits.MaxSnapshot }),
	uintField(7, "max_migration", func(m *Hello) *uint64 { return &m.Limits.MaxMigration }),
	uintField(8, "max_connections", func(m *Hello) *uint32 { return &m.Limits.MaxConnections }),
	stringField(9, "software", func(m *Hello) *string { return &m.Software }),
)

// Accepts reports whether the sender of the Hello accepts codec c.
func (m *Hello) Accepts(c Codec) bool { return c == CodecNone || m.Codecs&(1<<c) != 0 }

// Accept says that the sender accepts the peer's Hello. It has no fields.
type Accept struct{}

var acceptTable = newTable[Accept]("accept")

// Reject says that the sender refuses the handshake, and why.
type Reject struct {
	// Code says why, as a stable number.
	Code RejectCode
	// Reason says why, for people.
	Reason string
}

var rejectTable = newTable("reject",
	uintField(1, "code", func(m *Reject) *RejectCode { return &m.Code }),
	stringField(2, "reason", func(m *Reject) *string { return &m.Reason }),
)

// streamOpen is the first frame of every yamux stream.
type streamOpen struct {
	Kind  StreamKind
	Codec Codec
}

var streamOpenTable = newTable("stream-open",
	uintField(1, "kind", func(m *streamOpen) *StreamKind { return &m.Kind }),
	uintField(2, "codec", func(m *streamOpen) *Codec { return &m.Codec }),
)

// Prepare opens a migration (source → target): Count connections follow on
// snapshot streams, indexed 0 to Count-1. Lease bounds how long the target
// may hold its locks without hearing from the source.
type Prepare struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Count is the number of connections whose snapshots follow.
	Count uint32
	// Lease is how long the target may hold a lock without news.
	Lease time.Duration
	// Tuples, if not empty, are the 4-tuples of connections 0 to
	// len(Tuples)-1 (at most Count), in index order, sent so that the
	// target can lock them before the source freezes anything (version 2;
	// a source may leave them out).
	Tuples []Tuple
	// Presets are the distinct option sets that the target may give the
	// sockets it makes before the freeze (repair.Restorer.Preset), each
	// holding only the options repair.PresetOf keeps; Tuple.Preset picks
	// one per connection. At most MaxPresets. Optional: a target that
	// ignores them writes every option inside the freeze, and the
	// snapshot's options have the last word either way.
	Presets []repair.Options
}

// MaxPresets is the most option sets a Prepare may carry.
const MaxPresets = 256

// Tuple is the 4-tuple of a connection, as the local host sees it.
type Tuple struct {
	Local, Remote netip.AddrPort
	// Preset is 1 + the index in Prepare.Presets of the connection's
	// options as the source read them before its lock, or 0 for none.
	Preset uint32
}

var tupleTable = newTable("tuple",
	addrPortField(1, "local", func(t *Tuple) *netip.AddrPort { return &t.Local }),
	addrPortField(2, "remote", func(t *Tuple) *netip.AddrPort { return &t.Remote }),
	uintField(3, "preset", func(t *Tuple) *uint32 { return &t.Preset }),
)

var prepareTable = newTable("prepare",
	fixedField(1, "migration", 16, func(m *Prepare) []byte { return m.Migration[:] }),
	uintField(2, "count", func(m *Prepare) *uint32 { return &m.Count }),
	durationField(3, "lease", func(m *Prepare) *time.Duration { return &m.Lease }),
	nestedListField(4, "tuple", tupleTable, func(m *Prepare) *[]Tuple { return &m.Tuples }),
	boundedListField(5, "preset", optionsTable, MaxPresets, func(m *Prepare) *[]repair.Options { return &m.Presets }),
)

// Ready says that the target has made its lock table, written its journal
// and locked the 4-tuples PREPARE listed (target → source, version 2): the
// source may now lock and capture, and nothing of the target's set-up
// falls inside the freeze.
type Ready struct {
	// Migration is the migration's ID.
	Migration MigrationID
}

var readyTable = newTable("ready",
	fixedField(1, "migration", 16, func(m *Ready) []byte { return m.Migration[:] }),
)

// Precopied says that the source has written Count pre-copies on its
// snapshot streams (source → target, version 3): it locks nothing until
// the target answers PrecopyDone, so that the target's restores of them are
// not inside the freeze.
type Precopied struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Count is how many pre-copies the streams carry.
	Count uint32
}

var precopiedTable = newTable("precopied",
	fixedField(1, "migration", 16, func(m *Precopied) []byte { return m.Migration[:] }),
	uintField(2, "count", func(m *Precopied) *uint32 { return &m.Count }),
)

// PrecopyDone says that the target has restored (or refused) the Count
// pre-copies Precopied announced (target → source, version 3).
type PrecopyDone struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Count is how many pre-copies the target has dealt with.
	Count uint32
}

var precopyDoneTable = newTable("precopy-done",
	fixedField(1, "migration", 16, func(m *PrecopyDone) []byte { return m.Migration[:] }),
	uintField(2, "count", func(m *PrecopyDone) *uint32 { return &m.Count }),
)

// Verdicts carries the target's verdicts on a batch of connections (target →
// source). The target may send many, as restores finish; each connection
// gets exactly one verdict.
type Verdicts struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Verdicts are the verdicts of this batch, in any order.
	Verdicts []Verdict
}

var verdictsTable = newTable("verdicts",
	fixedField(1, "migration", 16, func(m *Verdicts) []byte { return m.Migration[:] }),
	nestedListField(2, "verdict", verdictTable, func(m *Verdicts) *[]Verdict { return &m.Verdicts }),
)

// Prepared says that every verdict has been sent (target → source): Count
// verdicts in all, OK of them VerdictOK. The target now holds OK connections
// restored and locked, waiting for Commit or Abort.
type Prepared struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Count is the number of verdicts sent, in all Verdicts messages.
	Count uint32
	// OK is the number of those that were VerdictOK.
	OK uint32
}

var preparedTable = newTable("prepared",
	fixedField(1, "migration", 16, func(m *Prepared) []byte { return m.Migration[:] }),
	uintField(2, "count", func(m *Prepared) *uint32 { return &m.Count }),
	uintField(3, "ok", func(m *Prepared) *uint32 { return &m.OK }),
)

// Switch says that the source has released the service addresses in Addrs
// and the target should claim them now (source → target). Addrs is empty
// when a hook outside tcpmigrate moves the addresses.
type Switch struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Addrs are the service addresses, with their prefix lengths, that the
	// target claims.
	Addrs []netip.Prefix
}

var switchTable = newTable("switch",
	fixedField(1, "migration", 16, func(m *Switch) []byte { return m.Migration[:] }),
	prefixesField(2, "addr", func(m *Switch) *[]netip.Prefix { return &m.Addrs }),
)

// Switched says that the target has claimed the addresses (target → source).
type Switched struct {
	// Migration is the migration's ID.
	Migration MigrationID
}

var switchedTable = newTable("switched",
	fixedField(1, "migration", 16, func(m *Switched) []byte { return m.Migration[:] }),
)

// Commit tells the target to commit every connection it prepared, except
// those listed in Exclude, which the source has rolled back on its side and
// the target must discard (source → target).
type Commit struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Exclude lists the indices of prepared connections to discard.
	Exclude []uint32
}

var commitTable = newTable("commit",
	fixedField(1, "migration", 16, func(m *Commit) []byte { return m.Migration[:] }),
	uint32sField(2, "exclude", func(m *Commit) *[]uint32 { return &m.Exclude }),
)

// Committed says that the target has committed and recorded the outcome in
// its journal, where it outlives the agent (target → source). Failed lists the connections that could not be
// delivered after commit; every other committed connection was delivered.
type Committed struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Failed lists the connections that failed after the commit.
	Failed []Verdict
	// Elapsed is the time from the target's receipt of COMMIT to its
	// sending of COMMITTED. With Resumed it lets the source place the end
	// of each freeze on its own clock (see Freezes). Zero: not reported.
	Elapsed time.Duration
	// Resumed holds, by connection index, the microseconds from the
	// target's receipt of COMMIT until that connection left repair mode
	// (its freeze ended); 0 for a connection not resumed. Empty: not
	// reported.
	Resumed []uint32
}

var committedTable = newTable("committed",
	fixedField(1, "migration", 16, func(m *Committed) []byte { return m.Migration[:] }),
	nestedListField(2, "failed", verdictTable, func(m *Committed) *[]Verdict { return &m.Failed }),
	durationField(3, "elapsed", func(m *Committed) *time.Duration { return &m.Elapsed }),
	uint32sField(4, "resumed", func(m *Committed) *[]uint32 { return &m.Resumed }),
)

// Freezes estimates, on the source's clock, when each connection's freeze
// ended: the target's Resumed offsets, shifted by the one-way delay of the
// link, taken as half of the round trip (sent: COMMIT sent; received:
// COMMITTED received) less the target's Elapsed. ends[i] is zero for a
// connection the target did not report; ok is false when it reported
// nothing usable (an older target, or an Elapsed longer than the round
// trip).
func (m *Committed) Freezes(sent, received time.Time) (ends []time.Time, ok bool) {
	rtt := received.Sub(sent)
	if len(m.Resumed) == 0 || m.Elapsed <= 0 || m.Elapsed > rtt {
		return nil, false
	}
	oneWay := (rtt - m.Elapsed) / 2
	ends = make([]time.Time, len(m.Resumed))
	for i, us := range m.Resumed {
		if us != 0 {
			ends[i] = sent.Add(oneWay + time.Duration(us)*time.Microsecond)
		}
	}
	return ends, true
}

// Abort rolls the migration back (either side, before Commit is sent).
type Abort struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Code says why, as a stable number.
	Code AbortCode
	// Reason says why, for people.
	Reason string
}

var abortTable = newTable("abort",
	fixedField(1, "migration", 16, func(m *Abort) []byte { return m.Migration[:] }),
	uintField(2, "code", func(m *Abort) *AbortCode { return &m.Code }),
	stringField(3, "reason", func(m *Abort) *string { return &m.Reason }),
)

// Query asks the target what became of a migration (source → target), to
// resolve the in-doubt window after a lost link.
type Query struct {
	// Migration is the ID of the migration asked about.
	Migration MigrationID
}

var queryTable = newTable("query",
	fixedField(1, "migration", 16, func(m *Query) []byte { return m.Migration[:] }),
)

// Outcome answers a Query with the target's record (target → source).
// Verdicts lists the connections that did not end VerdictOK.
type Outcome struct {
	// Migration is the ID of the migration asked about.
	Migration MigrationID
	// State is what the target recorded.
	State MigrationState
	// Verdicts lists the connections that did not end VerdictOK.
	Verdicts []Verdict
}

var outcomeTable = newTable("outcome",
	fixedField(1, "migration", 16, func(m *Outcome) []byte { return m.Migration[:] }),
	uintField(2, "state", func(m *Outcome) *MigrationState { return &m.State }),
	nestedListField(3, "verdict", verdictTable, func(m *Outcome) *[]Verdict { return &m.Verdicts }),
)

// endRecord closes a snapshot stream: Count records came before it.
type endRecord struct {
	Count uint32
}

var endTable = newTable("end",
	uintField(1, "count", func(m *endRecord) *uint32 { return &m.Count }),
)

// Type returns MsgHello.
func (*Hello) Type() MsgType { return MsgHello }

// Type returns MsgAccept.
func (*Accept) Type() MsgType { return MsgAccept }

// Type returns MsgReject.
func (*Reject) Type() MsgType { return MsgReject }

// Type returns MsgStreamOpen.
func (*streamOpen) Type() MsgType { return MsgStreamOpen }

// Type returns MsgPrepare.
func (*Prepare) Type() MsgType { return MsgPrepare }

// Type returns MsgReady.
func (*Ready) Type() MsgType { return MsgReady }

// Type returns MsgPrecopied.
func (*Precopied) Type() MsgType { return MsgPrecopied }

// Type returns MsgPrecopyDone.
func (*PrecopyDone) Type() MsgType { return MsgPrecopyDone }

// Type returns MsgVerdicts.
func (*Verdicts) Type() MsgType { return MsgVerdicts }

// Type returns MsgPrepared.
func (*Prepared) Type() MsgType { return MsgPrepared }

// Type returns MsgSwitch.
func (*Switch) Type() MsgType { return MsgSwitch }

// Type returns MsgSwitched.
func (*Switched) Type() MsgType { return MsgSwitched }

// Type returns MsgCommit.
func (*Commit) Type() MsgType { return MsgCommit }

// Type returns MsgCommitted.
func (*Committed) Type() MsgType { return MsgCommitted }

// Type returns MsgAbort.
func (*Abort) Type() MsgType { return MsgAbort }

// Type returns MsgQuery.
func (*Query) Type() MsgType { return MsgQuery }

// Type returns MsgOutcome.
func (*Outcome) Type() MsgType { return MsgOutcome }

// Type returns MsgEnd.
func (*endRecord) Type() MsgType { return MsgEnd }

func (m *Hello) appendFields(b []byte) []byte      { return helloTable.appendFields(b, m) }
func (m *Accept) appendFields(b []byte) []byte     { return acceptTable.appendFields(b, m) }
func (m *Reject) appendFields(b []byte) []byte     { return rejectTable.appendFields(b, m) }
func (m *streamOpen) appendFields(b []byte) []byte { return streamOpenTable.appendFields(b, m) }
func (m *Prepare) appendFields(b []byte) []byte    { return prepareTable.appendFields(b, m) }
func (m *Ready) appendFields(b []byte) []byte      { return readyTable.appendFields(b, m) }
func (m *Precopied) appendFields(b []byte) []byte  { return precopiedTable.appendFields(b, m) }
func (m *PrecopyDone) appendFields(b []byte) []byte {
	return precopyDoneTable.appendFields(b, m)
}
func (m *Verdicts) appendFields(b []byte) []byte  { return verdictsTable.appendFields(b, m) }
func (m *Prepared) appendFields(b []byte) []byte  { return preparedTable.appendFields(b, m) }
func (m *Switch) appendFields(b []byte) []byte    { return switchTable.appendFields(b, m) }
func (m *Switched) appendFields(b []byte) []byte  { return switchedTable.appendFields(b, m) }
func (m *Commit) appendFields(b []byte) []byte    { return commitTable.appendFields(b, m) }
func (m *Committed) appendFields(b []byte) []byte { return committedTable.appendFields(b, m) }
func (m *Abort) appendFields(b []byte) []byte     { return abortTable.appendFields(b, m) }
func (m *Query) appendFields(b []byte) []byte     { return queryTable.appendFields(b, m) }
func (m *Outcome) appendFields(b []byte) []byte   { return outcomeTable.appendFields(b, m) }
func (m *endRecord) appendFields(b []byte) []byte { return endTable.appendFields(b, m) }

func (m *Hello) decodeFields(b []byte) error       { return helloTable.decode(m, b) }
func (m *Accept) decodeFields(b []byte) error      { return acceptTable.decode(m, b) }
func (m *Reject) decodeFields(b []byte) error      { return rejectTable.decode(m, b) }
func (m *streamOpen) decodeFields(b []byte) error  { return streamOpenTable.decode(m, b) }
func (m *Prepare) decodeFields(b []byte) error     { return prepareTable.decode(m, b) }
func (m *Ready) decodeFields(b []byte) error       { return readyTable.decode(m, b) }
func (m *Precopied) decodeFields(b []byte) error   { return precopiedTable.decode(m, b) }
func (m *PrecopyDone) decodeFields(b []byte) error { return precopyDoneTable.decode(m, b) }
func (m *Verdicts) decodeFields(b []byte) error    { return verdictsTable.decode(m, b) }
func (m *Prepared) decodeFields(b []byte) error    { return preparedTable.decode(m, b) }
func (m *Switch) decodeFields(b []byte) error      { return switchTable.decode(m, b) }
func (m *Switched) decodeFields(b []byte) error    { return switchedTable.decode(m, b) }
func (m *Commit) decodeFields(b []byte) error      { return commitTable.decode(m, b) }
func (m *Committed) decodeFields(b []byte) error   { return committedTable.decode(m, b) }
func (m *Abort) decodeFields(b []byte) error       { return abortTable.decode(m, b) }
func (m *Query) decodeFields(b []byte) error       { return queryTable.decode(m, b) }
func (m *Outcome) decodeFields(b []byte) error     { return outcomeTable.decode(m, b) }
func (m *endRecord) decodeFields(b []byte) error   { return endTable.decode(m, b) }

// phase says where a message type may appear.
type phase uint8

const (
	phaseHandshake phase = iota + 1 // on the raw connection, before yamux
	phaseStream                     // first frame of a yamux stream
	phaseControl                    // on the control stream
	phaseSnapshot                   // in the body of a snapshot stream
)

// msgInfo describes one message type for the dispatch table.
type msgInfo struct {
	name  string
	phase phase
	new   func() Message // nil for MsgSnapshot, which is decoded by decodeSnapshot
}

// msgTable is indexed by message type; decoding checks the range, then
// dispatches through it.
var msgTable = [...]msgInfo{
	MsgHello:          {"HELLO", phaseHandshake, func() Message { return new(Hello) }},
	MsgAccept:         {"ACCEPT", phaseHandshake, func() Message { return new(Accept) }},
	MsgReject:         {"REJECT", phaseHandshake, func() Message { return new(Reject) }},
	MsgStreamOpen:     {"STREAM_OPEN", phaseStream, func() Message { return new(streamOpen) }},
	MsgPrepare:        {"PREPARE", phaseControl, func() Message { return new(Prepare) }},
	MsgVerdicts:       {"VERDICTS", phaseControl, func() Message { return new(Verdicts) }},
	MsgPrepared:       {"PREPARED", phaseControl, func() Message { return new(Prepared) }},
	MsgSwitch:         {"SWITCH", phaseControl, func() Message { return new(Switch) }},
	MsgSwitched:       {"SWITCHED", phaseControl, func() Message { return new(Switched) }},
	MsgCommit:         {"COMMIT", phaseControl, func() Message { return new(Commit) }},
	MsgCommitted:      {"COMMITTED", phaseControl, func() Message { return new(Committed) }},
	MsgAbort:          {"ABORT", phaseControl, func() Message { return new(Abort) }},
	MsgQuery:          {"QUERY", phaseControl, func() Message { return new(Query) }},
	MsgOutcome:        {"OUTCOME", phaseControl, func() Message { return new(Outcome) }},
	MsgListeners:      {"LISTENERS", phaseControl, func() Message { return new(Listeners) }},
	MsgListenersReady: {"LISTENERS_READY", phaseControl, func() Message { return new(ListenersReady) }},
	MsgReady:          {"READY", phaseControl, func() Message { return new(Ready) }},
	MsgPrecopied:      {"PRECOPIED", phaseControl, func() Message { return new(Precopied) }},
	MsgPrecopyDone:    {"PRECOPY_DONE", phaseControl, func() Message { return new(PrecopyDone) }},
	MsgSnapshot:       {"SNAPSHOT", phaseSnapshot, nil},
	MsgEnd:            {"END", phaseSnapshot, func() Message { return new(endRecord) }},
}

// errSkip is returned by decodeMessage for an ancillary type it does not
// know: the caller drops the frame and reads the next.
var errSkip = &OpError{Op: "decode", Err: ErrUnexpected}

// decodeMessage decodes the body of a frame of type t expected in phase p.
func decodeMessage(p phase, t MsgType, body []byte) (Message, error) {
	if int(t) >= len(msgTable) || msgTable[t].name == "" {
		if t >= msgAncillary {
			return nil, errSkip
		}
		return nil, malformedf("unknown message type 0x%02x", uint8(t))
	}
	info := &msgTable[t]
	if info.phase != p || info.new == nil {
		return nil, unexpected(t, p)
	}
	m := info.new()
	if err := m.decodeFields(body); err != nil {
		return nil, err
	}
	if err := validate(m); err != nil {
		return nil, err
	}
	return m, nil
}

var phaseNames = [...]string{
	phaseHandshake: "the handshake",
	phaseStream:    "a stream's first frame",
	phaseControl:   "the control stream",
	phaseSnapshot:  "a snapshot stream",
}

func unexpected(t MsgType, p phase) error {
	return &unexpectedError{t: t, where: phaseNames[p]}
}

type unexpectedError struct {
	t     MsgType
	where string
}

func (e *unexpectedError) Error() string {
	return "unexpected message: " + e.t.String() + " in " + e.where
}

func (e *unexpectedError) Is(target error) bool { return target == ErrUnexpected }

// validate checks what the field tables cannot: required fields.
func validate(m Message) error {
	switch m := m.(type) {
	case *Reject:
		if m.Code == 0 {
			return malformedf("reject: no code")
		}
	case *Verdicts:
		return validateVerdicts("verdicts", m.Verdicts)
	case *Committed:
		return validateVerdicts("committed", m.Failed)
	case *Outcome:
		if m.State == 0 {
			return malformedf("outcome: no state")
		}
		return validateVerdicts("outcome", m.Verdicts)
	case *Abort:
		if m.Code == 0 {
			return malformedf("abort: no code")
		}
	case *Prepare:
		if uint64(len(m.Tuples)) > uint64(m.Count) {
			return malformedf("prepare: %d tuples for %d connections", len(m.Tuples), m.Count)
		}
		if len(m.Presets) > MaxPresets {
			return malformedf("prepare: %d option presets, more than %d", len(m.Presets), MaxPresets)
		}
		for i := range m.Tuples {
			if p := m.Tuples[i].Preset; uint64(p) > uint64(len(m.Presets)) {
				return malformedf("prepare: connection %d names option preset %d of %d", i, p, len(m.Presets))
			}
		}
	case *streamOpen:
		if m.Kind == 0 {
			return malformedf("stream-open: no kind")
		}
	}
	return nil
}

func validateVerdicts(name string, vs []Verdict) error {
	for i := range vs {
		if vs[i].Code == 0 {
			return malformedf("%s: verdict for connection %d has no code", name, vs[i].Index)
		}
	}
	return nil
}

// appendFrame appends m as a frame: length, type, fields.
func appendFrame(b []byte, m Message) []byte {
	start := len(b)
	b = append(b, 0, 0, 0, 0, byte(m.Type()))
	b = m.appendFields(b)
	putFrameLength(b[start:], len(b)-start-4)
	return b
}

func putFrameLength(b []byte, n int) {
	b[0], b[1], b[2], b[3] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
}
