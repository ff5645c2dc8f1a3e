package transport

import (
	"encoding/binary"
	"net/netip"
	"strconv"
	"time"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// The snapshot record. Its body is the fields of snapshotTable (the index,
// then every member of repair.Snapshot), its Options nested as the fields of
// optionsTable. docs/protocol.md lists every tag; const_test.go pins them.
//
// To add a member to repair.Snapshot or repair.Options: give it the next
// free tag in its table, document it, pin it. Older decoders skip it.

// record is what a snapshot record decodes into.
type record struct {
	index uint32
	pass  Pass
	snap  repair.Snapshot
	state []byte // the application's state for the connection (tag 19)
}

// Pass says what a snapshot record is to its connection (tag 20, version
// 3). Every connection gets exactly one record of pass PassFinal or
// PassConfirm; before it, at most one of PassPre.
type Pass uint8

// The passes of a snapshot record.
const (
	// PassFinal is the snapshot taken after the source's lock: the one the
	// target commits. A record without tag 20 is final.
	PassFinal Pass = 0
	// PassPre is a copy taken before the lock, while the peer was held and
	// had nothing in flight: the target restores it ahead of the freeze and
	// keeps it until a final or confirming record of the same connection
	// says what stands.
	PassPre Pass = 1
	// PassConfirm carries only the index: nothing reached or left the
	// connection between its pre-copy and the lock, so the pre-copy is its
	// final snapshot.
	PassConfirm Pass = 2
)

// String names the pass as docs/protocol.md does.
func (p Pass) String() string {
	switch p {
	case PassFinal:
		return "final"
	case PassPre:
		return "pre"
	case PassConfirm:
		return "confirm"
	}
	return "pass(" + strconv.Itoa(int(p)) + ")"
}

var snapshotTable = newTable("snapshot",
	uintField(1, "index", func(r *record) *uint32 { return &r.index }),
	addrPortField(2, "local", func(r *record) *netip.AddrPort { return &r.snap.Local }),
	addrPortField(3, "remote", func(r *record) *netip.AddrPort { return &r.snap.Remote }),
	uintField(4, "family", func(r *record) *uint16 { return &r.snap.Family }),
	uintField(5, "state", func(r *record) *repair.State { return &r.snap.State }),
	uintField(6, "flags", func(r *record) *repair.Flags { return &r.snap.Flags }),
	uintField(7, "shutdown", func(r *record) *repair.Shutdown { return &r.snap.Shutdown }),
	uintField(8, "snd_wscale", func(r *record) *uint8 { return &r.snap.SndWScale }),
	uintField(9, "rcv_wscale", func(r *record) *uint8 { return &r.snap.RcvWScale }),
	uintField(10, "mss_clamp", func(r *record) *uint32 { return &r.snap.MSSClamp }),
	uintField(11, "timestamp", func(r *record) *uint32 { return &r.snap.Timestamp }),
	uintField(12, "send_seq", func(r *record) *uint32 { return &r.snap.SendSeq }),
	uintField(13, "recv_seq", func(r *record) *uint32 { return &r.snap.RecvSeq }),
	windowField(14, "window", func(r *record) *repair.Window { return &r.snap.Window }),
	uintField(17, "unsent", func(r *record) *uint32 { return &r.snap.Unsent }),
	nestedField(18, "options", optionsTable, func(r *record) *repair.Options { return &r.snap.Options }),
	bytesField(tagAppState, "app_state", func(r *record) *[]byte { return &r.state }),
	uintField(tagPass, "pass", func(r *record) *Pass { return &r.pass }),
	// The queues come last, so that SnapshotWriter can stream them.
	bytesField(tagRecvQueue, "recv_queue", func(r *record) *[]byte { return &r.snap.RecvQueue }),
	bytesField(tagSendQueue, "send_queue", func(r *record) *[]byte { return &r.snap.SendQueue }),
)

// The tags of the queues, which SnapshotWriter writes itself.
const (
	tagRecvQueue = 15
	tagSendQueue = 16
)

// tagAppState is the tag of the application's opaque state, which travels
// with the snapshot (send --handoff to receive --deliver, or the Go API).
const tagAppState = 19

// tagPass is the tag of the record's Pass (version 3).
const tagPass = 20

type opts = repair.Options

var optionsTable = newTable("options",
	uintField(1, "mask", func(o *opts) *repair.OptMask { return &o.Mask }),
	intField(2, "sndbuf", func(o *opts) *int32 { return &o.SndBuf }),
	intField(3, "rcvbuf", func(o *opts) *int32 { return &o.RcvBuf }),
	uintField(4, "buf_lock", func(o *opts) *uint8 { return &o.BufLock }),
	boolField(5, "reuseaddr", func(o *opts) *bool { return &o.ReuseAddr }),
	boolField(6, "reuseport", func(o *opts) *bool { return &o.ReusePort }),
	boolField(7, "keepalive", func(o *opts) *bool { return &o.KeepAlive }),
	intField(8, "keepidle", func(o *opts) *int32 { return &o.KeepIdle }),
	intField(9, "keepintvl", func(o *opts) *int32 { return &o.KeepIntvl }),
	intField(10, "keepcnt", func(o *opts) *int32 { return &o.KeepCnt }),
	boolField(11, "nodelay", func(o *opts) *bool { return &o.NoDelay }),
	boolField(12, "cork", func(o *opts) *bool { return &o.Cork }),
	boolField(13, "oobinline", func(o *opts) *bool { return &o.OOBInline }),
	boolField(14, "dontroute", func(o *opts) *bool { return &o.DontRoute }),
	intField(15, "linger_secs", func(o *opts) *int32 { return &o.LingerSecs }),
	uintField(16, "mark", func(o *opts) *uint32 { return &o.Mark }),
	intField(17, "priority", func(o *opts) *int32 { return &o.Priority }),
	intField(18, "rcvlowat", func(o *opts) *int32 { return &o.RcvLowat }),
	durationField(19, "sndtimeo", func(o *opts) *time.Duration { return &o.SndTimeo }),
	durationField(20, "rcvtimeo", func(o *opts) *time.Duration { return &o.RcvTimeo }),
	stringField(21, "bindtodevice", func(o *opts) *string { return &o.BindToDevice }),
	intField(22, "peek_off", func(o *opts) *int32 { return &o.PeekOff }),
	uintField(23, "user_timeout", func(o *opts) *uint32 { return &o.UserTimeout }),
	stringField(24, "congestion", func(o *opts) *string { return &o.Congestion }),
	uintField(25, "notsent_lowat", func(o *opts) *uint32 { return &o.NotSentLowat }),
	uintField(26, "window_clamp", func(o *opts) *uint32 { return &o.WindowClamp }),
	intField(27, "linger2", func(o *opts) *int32 { return &o.Linger2 }),
	uintField(28, "rto_min_us", func(o *opts) *uint32 { return &o.RTOMinUs }),
	uintField(29, "rto_max_ms", func(o *opts) *uint32 { return &o.RTOMaxMs }),
	uintField(30, "tx_delay_us", func(o *opts) *uint32 { return &o.TxDelayUs }),
	uintField(31, "max_pacing_rate", func(o *opts) *uint64 { return &o.MaxPacingRate }),
	uintField(32, "tos", func(o *opts) *uint8 { return &o.TOS }),
	intField(33, "ttl", func(o *opts) *int32 { return &o.TTL }),
	intField(34, "tclass", func(o *opts) *int32 { return &o.TClass }),
	intField(35, "unicast_hops", func(o *opts) *int32 { return &o.UnicastHops }),
	intField(36, "mtu_discover", func(o *opts) *int32 { return &o.MTUDiscover }),
)

// windowField is the repair window: the five 32-bit fields of struct
// tcp_repair_window, big-endian, 20 bytes. A longer value (a newer kernel's
// larger structure) is accepted and its tail ignored.
func windowField[S any](tag uint64, name string, get func(*S) *repair.Window) field[S] {
	return field[S]{tag: tag, name: name,
		enc: func(b []byte, s *S) []byte {
			w := get(s)
			if *w == (repair.Window{}) {
				return b
			}
			b = appendHeader(b, tag, 20)
			for _, x := range [5]uint32{w.SndWl1, w.SndWnd, w.MaxWindow, w.RcvWnd, w.RcvWup} {
				b = binary.BigEndian.AppendUint32(b, x)
			}
			return b
		},
		dec: func(s *S, v []byte) error {
			if len(v) < 20 {
				return malformedf("%d bytes, want 20", len(v))
			}
			be := binary.BigEndian
			*get(s) = repair.Window{
				SndWl1: be.Uint32(v), SndWnd: be.Uint32(v[4:]), MaxWindow: be.Uint32(v[8:]),
				RcvWnd: be.Uint32(v[12:]), RcvWup: be.Uint32(v[16:]),
			}
			return nil
		},
	}
}

// appendSnapshot appends the body of a snapshot record (without the frame
// header).
func appendSnapshot(b []byte, index uint32, s *repair.Snapshot) []byte {
	// The table works on a record; build one that shares s's slices.
	r := record{index: index, snap: *s}
	return snapshotTable.appendFields(b, &r)
}

// appendSnapshotFrame appends a whole snapshot record frame.
func appendSnapshotFrame(b []byte, index uint32, s *repair.Snapshot) []byte {
	start := len(b)
	b = append(b, 0, 0, 0, 0, byte(MsgSnapshot))
	b = appendSnapshot(b, index, s)
	putFrameLength(b[start:], len(b)-start-4)
	return b
}

// decodeSnapshot decodes the body of a snapshot record. The queues of the
// returned Snapshot alias body.
func decodeSnapshot(body []byte) (uint32, *repair.Snapshot, error) {
	r, err := decodeRecord(body)
	if err != nil {
		return 0, nil, err
	}
	return r.index, &r.snap, nil
}

// decodeRecord decodes the body of a snapshot record, application state
// included. Its slices alias body.
func decodeRecord(body []byte) (*record, error) {
	r := new(record)
	if err := snapshotTable.decode(r, body); err != nil {
		return nil, err
	}
	// The one structural check: Unsent indexes into SendQueue, and the
	// accessors of repair.Snapshot would panic on a larger value. Every
	// other check is repair's (Validate), on the target's policy path.
	switch r.pass {
	case PassFinal, PassPre:
	case PassConfirm:
		// A confirmation is the index alone: a snapshot in it would be
		// one the target never uses.
		if r.snap.Local.IsValid() || r.snap.Remote.IsValid() || len(r.snap.RecvQueue)+len(r.snap.SendQueue)+len(r.state) > 0 {
			return nil, malformedf("snapshot %d: a confirmation carries a snapshot", r.index)
		}
	default:
		return nil, malformedf("snapshot %d: unknown pass %d", r.index, r.pass)
	}
	if uint64(r.snap.Unsent) > uint64(len(r.snap.SendQueue)) {
		return nil, malformedf("snapshot %d: unsent %d exceeds the send queue's %d bytes",
			r.index, r.snap.Unsent, len(r.snap.SendQueue))
	}
	return r, nil
}
