package transport

import (
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// TestWireConstants pins every value that is on the wire. A failure here
// means the protocol changed: change docs/protocol.md and the version too,
// or undo the change.
func TestWireConstants(t *testing.T) {
	pin := func(name string, got, want any) {
		t.Helper()
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s = %v, pinned at %v", name, got, want)
		}
	}
	pin("Magic", string(Magic[:]), "TMIG")
	pin("ProtocolVersion", ProtocolVersion, 3)
	pin("MinProtocolVersion", MinProtocolVersion, 1)
	pin("preambleSize", preambleSize, 8)
	pin("frameHeaderSize", frameHeaderSize, 5)
	pin("HandshakeMaxFrame", HandshakeMaxFrame, 65536)
	pin("MaxChunk", MaxChunk, 131072)
	pin("chunkZstd", uint32(chunkZstd), uint32(0x80000000))
	pin("chunkHeader", chunkHeader, 4)
	pin("msgAncillary", uint8(msgAncillary), 0x80)
	pin("tlsRecordHandshake", tlsRecordHandshake, 0x16)

	types := map[MsgType]uint8{
		MsgHello: 0x01, MsgAccept: 0x02, MsgReject: 0x03, MsgStreamOpen: 0x04,
		MsgPrepare: 0x10, MsgVerdicts: 0x11, MsgPrepared: 0x12, MsgSwitch: 0x13, MsgSwitched: 0x14,
		MsgCommit: 0x15, MsgCommitted: 0x16, MsgAbort: 0x17, MsgQuery: 0x18, MsgOutcome: 0x19,
		MsgListeners: 0x1a, MsgListenersReady: 0x1b, MsgReady: 0x1c, MsgPrecopied: 0x1d, MsgPrecopyDone: 0x1e, MsgSnapshot: 0x20, MsgEnd: 0x21,
	}
	names := map[uint8]string{
		0x01: "HELLO", 0x02: "ACCEPT", 0x03: "REJECT", 0x04: "STREAM_OPEN", 0x10: "PREPARE", 0x11: "VERDICTS",
		0x12: "PREPARED", 0x13: "SWITCH", 0x14: "SWITCHED", 0x15: "COMMIT", 0x16: "COMMITTED", 0x17: "ABORT",
		0x18: "QUERY", 0x19: "OUTCOME", 0x1a: "LISTENERS", 0x1b: "LISTENERS_READY", 0x1c: "READY", 0x1d: "PRECOPIED", 0x1e: "PRECOPY_DONE", 0x20: "SNAPSHOT", 0x21: "END",
	}
	for typ, v := range types {
		pin("message type "+names[v], uint8(typ), v)
		pin("name of message type "+names[v], typ.String(), names[v])
	}
	known := 0
	for i := range msgTable {
		if msgTable[i].name != "" {
			known++
		}
	}
	pin("number of message types", known, len(types))

	pin("StreamControl", StreamControl, 1)
	pin("StreamSnapshots", StreamSnapshots, 2)
	pin("CodecNone", uint8(CodecNone), 0)
	pin("CodecZstd", uint8(CodecZstd), 1)
	for code, v := range map[RejectCode]int{RejectVersion: 1, RejectFeature: 2, RejectTLSRequired: 3,
		RejectPlaintext: 4, RejectMalformed: 5, RejectPolicy: 6} {
		pin("reject code "+code.String(), uint8(code), v)
	}
	for code, v := range map[VerdictCode]int{VerdictOK: 1, VerdictRefused: 2, VerdictFailed: 3, VerdictLimit: 4,
		VerdictInvalid: 5, VerdictConflict: 6, VerdictUnsupported: 7} {
		pin("verdict code "+code.String(), uint8(code), v)
	}
	for code, v := range map[AbortCode]int{AbortError: 1, AbortTimeout: 2, AbortCanceled: 3, AbortPolicy: 4} {
		pin("abort code "+code.String(), uint8(code), v)
	}
	for st, v := range map[MigrationState]int{StateUnknown: 1, StatePreparing: 2, StateCommitted: 3, StateAborted: 4} {
		pin("migration state "+st.String(), uint8(st), v)
	}

	// The field tags of every table, in encoding order.
	tables := map[string]string{
		"hello":       tagList(helloTable),
		"accept":      tagList(acceptTable),
		"reject":      tagList(rejectTable),
		"stream-open": tagList(streamOpenTable),
		"prepare":     tagList(prepareTable),
		"tuple":       tagList(tupleTable),
		"ready":       tagList(readyTable),
		"verdicts":    tagList(verdictsTable),
		"verdict":     tagList(verdictTable),
		"prepared":    tagList(preparedTable),
		"switch":      tagList(switchTable),
		"switched":    tagList(switchedTable),
		"commit":      tagList(commitTable),
		"committed":   tagList(committedTable),
		"abort":       tagList(abortTable),
		"query":       tagList(queryTable),
		"outcome":     tagList(outcomeTable),
		"end":         tagList(endTable),
		"snapshot":    tagList(snapshotTable),
		"options":     tagList(optionsTable),
	}
	want := map[string]string{
		"hello":       "1:features 2:kernel 3:congestion 4:codecs 5:max_frame 6:max_snapshot 7:max_migration 8:max_connections 9:software",
		"accept":      "",
		"reject":      "1:code 2:reason",
		"stream-open": "1:kind 2:codec",
		"prepare":     "1:migration 2:count 3:lease 4:tuple 5:preset",
		"tuple":       "1:local 2:remote 3:preset",
		"ready":       "1:migration",
		"verdicts":    "1:migration 2:verdict",
		"verdict":     "1:index 2:code 3:reason",
		"prepared":    "1:migration 2:count 3:ok",
		"switch":      "1:migration 2:addr",
		"switched":    "1:migration",
		"commit":      "1:migration 2:exclude",
		"committed":   "1:migration 2:failed 3:elapsed 4:resumed",
		"abort":       "1:migration 2:code 3:reason",
		"query":       "1:migration",
		"outcome":     "1:migration 2:state 3:verdict",
		"end":         "1:count",
		"snapshot": "1:index 2:local 3:remote 4:family 5:state 6:flags 7:shutdown 8:snd_wscale 9:rcv_wscale " +
			"10:mss_clamp 11:timestamp 12:send_seq 13:recv_seq 14:window 17:unsent 18:options 19:app_state 20:pass 15:recv_queue 16:send_queue",
		"options": "1:mask 2:sndbuf 3:rcvbuf 4:buf_lock 5:reuseaddr 6:reuseport 7:keepalive 8:keepidle " +
			"9:keepintvl 10:keepcnt 11:nodelay 12:cork 13:oobinline 14:dontroute 15:linger_secs 16:mark " +
			"17:priority 18:rcvlowat 19:sndtimeo 20:rcvtimeo 21:bindtodevice 22:peek_off 23:user_timeout " +
			"24:congestion 25:notsent_lowat 26:window_clamp 27:linger2 28:rto_min_us 29:rto_max_ms " +
			"30:tx_delay_us 31:max_pacing_rate 32:tos 33:ttl 34:tclass 35:unicast_hops 36:mtu_discover",
	}
	for name, w := range want {
		pin("tags of "+name, tables[name], w)
	}
	pin("number of tables", len(tables), len(want))
}

func tagList[S any](t *fieldTable[S]) string {
	var parts []string
	for _, f := range t.fields {
		parts = append(parts, fmt.Sprintf("%d:%s", f.tag, f.name))
	}
	return strings.Join(parts, " ")
}

// TestGoldenEncodings pins whole encodings, byte for byte, as
// docs/protocol.md shows them.
func TestGoldenEncodings(t *testing.T) {
	id := MigrationID{0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10}
	snap := &repair.Snapshot{
		Local:     netip.MustParseAddrPort("198.18.0.2:443"),
		Remote:    netip.MustParseAddrPort("198.18.1.7:51234"),
		Family:    2,
		State:     repair.StateEstablished,
		Flags:     repair.FlagSACK | repair.FlagWScale | repair.FlagTimestamps | repair.FlagWindow,
		SndWScale: 7, RcvWScale: 9, MSSClamp: 1460, Timestamp: 0x12345678,
		SendSeq: 1000, RecvSeq: 5000,
		Window:    repair.Window{SndWl1: 4999, SndWnd: 65535, MaxWindow: 65535, RcvWnd: 64240, RcvWup: 5000},
		RecvQueue: []byte("hi"), SendQueue: []byte("hello"), Unsent: 2,
		Options: repair.Options{SndBuf: 87040, KeepAlive: true, Congestion: "cubic", Mask: repair.OptCongestion, TTL: 64},
	}
	cases := []struct {
		name string
		got  []byte
		want string
	}{
		{"preamble", appendPreamble(nil), "544d4947 0001 0003"},
		{"accept", appendFrame(nil, &Accept{}), "00000001 02"},
		{"reject", appendFrame(nil, &Reject{Code: RejectVersion, Reason: "v2"}), "00000008 03 010101 02027632"},
		{"stream-open", appendFrame(nil, &streamOpen{Kind: StreamSnapshots, Codec: CodecZstd}), "00000007 04 010102 020101"},
		{"prepare", appendFrame(nil, &Prepare{Migration: id, Count: 300, Lease: 10 * time.Second}),
			"0000001e 10 0110 0123456789abcdeffedcba9876543210 0202ac02 0305 8090dfc04a"},
		{"verdicts", appendFrame(nil, &Verdicts{Migration: id, Verdicts: []Verdict{{Index: 0, Code: VerdictOK},
			{Index: 5, Code: VerdictRefused, Reason: "port"}}}),
			"00000026 11 0110 0123456789abcdeffedcba9876543210 0203 020101 020c 010105 020102 0304706f7274"},
		{"commit", appendFrame(nil, &Commit{Migration: id, Exclude: []uint32{3, 200}}),
			"00000018 15 0110 0123456789abcdeffedcba9876543210 0203 03c801"},
		{"end", appendFrame(nil, &endRecord{Count: 2}), "00000004 21 010102"},
		{"snapshot", appendSnapshotFrame(nil, 42, snap),
			"00000072 20 01012a 0206c612000201bb 0306c6120107c822 040102 050101 060127 080107 090109 0a02b40b " +
				"0b05f8acd19101 0c02e807 0d028827 0e14 00001387 0000ffff 0000ffff 0000faf0 00001388 110102 " +
				"1216 010108 020380d00a 070101 18056375626963 21028001 0f026869 100568656c6c6f"},
	}
	for _, c := range cases {
		want := strings.ReplaceAll(c.want, " ", "")
		if got := hex.EncodeToString(c.got); got != want {
			t.Errorf("%s:\n got %s\nwant %s", c.name, got, want)
		}
	}
}
