package firewall

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// TestNetlinkConstants pins the sizes the batch layout depends on.
func TestNetlinkConstants(t *testing.T) {
	if elemLen(keyLen4) != 28 || elemLen(keyLen6) != 52 ||
		elemsPerMsg(keyLen4) != 2340 || elemsPerMsg(keyLen6) != 1260 ||
		nlmsgHdrLen != 16 || nlaHdrLen != 4 || maxAttrLen != 65535 {
		t.Fatal("a netlink size changed; check the layout in netlink_linux.go")
	}
}

// elemMsg is what an element message says, decoded.
type elemMsg struct {
	typ         uint16 // NFT_MSG_*
	flags       uint16
	family      uint8
	table, set  string
	keys        [][]byte
	listElemLen []int // length of each NFTA_LIST_ELEM
}

// decodeElemMsg decodes an NFT_MSG_NEWSETELEM or _DELSETELEM message with
// mdlayher/netlink, independently of the encoder under test.
func decodeElemMsg(t *testing.T, m netlink.Message) elemMsg {
	t.Helper()
	e := elemMsg{typ: uint16(m.Header.Type) & 0xff, flags: uint16(m.Header.Flags), family: m.Data[0]}
	if uint16(m.Header.Type)>>8 != unix.NFNL_SUBSYS_NFTABLES || m.Data[1] != unix.NFNETLINK_V0 {
		t.Fatalf("message type %#x, nfgenmsg %x", m.Header.Type, m.Data[:4])
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[4:])
	if err != nil {
		t.Fatal(err)
	}
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_SET_ELEM_LIST_TABLE:
			e.table = ad.String()
		case unix.NFTA_SET_ELEM_LIST_SET:
			e.set = ad.String()
		case unix.NFTA_SET_ELEM_LIST_ELEMENTS:
			ad.Nested(func(list *netlink.AttributeDecoder) error {
				for list.Next() {
					e.listElemLen = append(e.listElemLen, len(list.Bytes()))
					list.Nested(func(el *netlink.AttributeDecoder) error {
						for el.Next() {
							if el.Type() != unix.NFTA_SET_ELEM_KEY {
								return fmt.Errorf("element attribute %d", el.Type())
							}
							el.Nested(func(k *netlink.AttributeDecoder) error {
								for k.Next() {
									if k.Type() != unix.NFTA_DATA_VALUE {
										return fmt.Errorf("key attribute %d", k.Type())
									}
									e.keys = append(e.keys, k.Bytes())
								}
								return nil
							})
						}
						return nil
					})
				}
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	return e
}

// splitBatch parses a batch buffer into its netlink messages.
func splitBatch(t *testing.T, buf []byte) []netlink.Message {
	t.Helper()
	var ms []netlink.Message
	for len(buf) > 0 {
		if len(buf) < nlmsgHdrLen {
			t.Fatalf("%d trailing bytes", len(buf))
		}
		l := int(binary.NativeEndian.Uint32(buf))
		if l < nlmsgHdrLen || l > len(buf) || l%4 != 0 {
			t.Fatalf("message length %d of %d bytes left", l, len(buf))
		}
		var m netlink.Message
		if err := m.UnmarshalBinary(buf[:l]); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, m)
		buf = buf[l:]
	}
	return ms
}

func testKeys(n int, v4 bool) ([]conn, []byte) {
	local, remote := netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.1.1")
	if !v4 {
		local, remote = netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00::1:1")
	}
	var cs []conn
	var keys []byte
	for _, tu := range tuples(n, local, remote) {
		c := connOf(tu)
		cs = append(cs, c)
		keys = c.appendKey(keys)
	}
	return cs, keys
}

// TestBatchLayout checks the framing of a whole batch: BEGIN and END around
// the messages, consecutive sequence numbers, acks asked for every nf_tables
// message, element lists split below the 16-bit attribute length, every key
// once, in order.
func TestBatchLayout(t *testing.T) {
	_, k4 := testKeys(5000, true)
	_, k6 := testKeys(3, false)
	var b batch
	b.begin(100)
	b.elements(unix.NFT_MSG_NEWSETELEM, "tcpmigrate_x", setV4, keyLen4, k4)
	b.elements(unix.NFT_MSG_DELSETELEM, "tcpmigrate_x", setV6, keyLen6, k6)
	b.elements(unix.NFT_MSG_DELSETELEM, "tcpmigrate_x", setV6, keyLen6, nil)
	b.delTable("tcpmigrate_x")
	b.end()
	ms := splitBatch(t, b.buf)
	// BEGIN, 3 messages for 5,000 v4 keys (2,340 a message), 1 for v6,
	// the table deletion, END.
	if len(ms) != 7 || len(b.msgs) != 5 {
		t.Fatalf("%d messages, %d infos; want 7 and 5", len(ms), len(b.msgs))
	}
	for i, m := range ms {
		if m.Header.Sequence != 100+uint32(i) || m.Header.PID != 0 {
			t.Errorf("message %d: sequence %d, port %d", i, m.Header.Sequence, m.Header.PID)
		}
	}
	for i, typ := range []int{unix.NFNL_MSG_BATCH_BEGIN, unix.NFNL_MSG_BATCH_END} {
		m := ms[i*(len(ms)-1)]
		if int(m.Header.Type) != typ || m.Header.Flags != netlink.Request ||
			!bytes.Equal(m.Data, []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES}) {
			t.Errorf("batch delimiter %d: %+v %x", i, m.Header, m.Data)
		}
	}
	var got []byte
	for i, m := range ms[1:4] {
		e := decodeElemMsg(t, m)
		if e.typ != unix.NFT_MSG_NEWSETELEM || e.flags != unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE ||
			e.family != unix.NFPROTO_INET || e.table != "tcpmigrate_x" || e.set != setV4 {
			t.Errorf("v4 message %d: %+v", i, e)
		}
		if want := min(5000-i*2340, 2340); len(e.keys) != want {
			t.Errorf("v4 message %d has %d keys, want %d", i, len(e.keys), want)
		}
		for _, k := range e.keys {
			got = append(got, k...)
		}
	}
	if !bytes.Equal(got, k4) {
		t.Error("the v4 keys differ from those encoded")
	}
	if e := decodeElemMsg(t, ms[4]); e.typ != unix.NFT_MSG_DELSETELEM || e.flags != unix.NLM_F_REQUEST|unix.NLM_F_ACK ||
		e.set != setV6 || !bytes.Equal(slices.Concat(e.keys...), k6) {
		t.Errorf("v6 message: %+v", e)
	}
	if m := ms[5]; m.Header.Type != unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_DELTABLE ||
		!bytes.Contains(m.Data, []byte("tcpmigrate_x\x00")) {
		t.Errorf("table deletion: %+v %x", m.Header, m.Data)
	}
	if got := fmt.Sprint(b.msgs[3]); got != "delete elements from set v6" {
		t.Errorf("message name %q", got)
	}
}

// TestElementsLikeNftables compares the element messages with those
// google/nftables builds for the same elements: same message type, family,
// table, set and keys, and the same NFTA_LIST_ELEM encoding.
func TestElementsLikeNftables(t *testing.T) {
	for _, v4 := range []bool{true, false} {
		_, keys := testKeys(100, v4)
		set, kl, kt := setV4, keyLen4, keyType4
		if !v4 {
			set, kl, kt = setV6, keyLen6, keyType6
		}
		for _, typ := range []uint16{unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM} {
			var sent []netlink.Message
			c, err := nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
				sent = append(sent, req...)
				return req, nil
			}))
			if err != nil {
				t.Fatal(err)
			}
			s := &nftables.Set{Table: &nftables.Table{Name: "tcpmigrate_x", Family: nftables.TableFamilyINet},
				Name: set, KeyType: kt, HasTimeout: true, Concatenation: true}
			var els []nftables.SetElement
			for k := range slices.Chunk(keys, kl) {
				els = append(els, nftables.SetElement{Key: k})
			}
			if typ == unix.NFT_MSG_NEWSETELEM {
				err = c.SetAddElements(s, els)
			} else {
				err = c.SetDeleteElements(s, els)
			}
			if err != nil {
				t.Fatal(err)
			}
			c.Flush()
			var theirs *elemMsg
			for _, m := range sent {
				if uint16(m.Header.Type)>>8 == unix.NFNL_SUBSYS_NFTABLES {
					e := decodeElemMsg(t, m)
					theirs = &e
				}
			}
			if theirs == nil {
				t.Fatal("google/nftables sent no element message")
			}
			var b batch
			b.begin(1)
			b.elements(typ, "tcpmigrate_x", set, kl, keys)
			b.end()
			ours := decodeElemMsg(t, splitBatch(t, b.buf)[1])
			if len(ours.keys) != 100 {
				t.Fatalf("%d keys decoded, want 100", len(ours.keys))
			}
			if ours.typ != theirs.typ || ours.family != theirs.family || ours.table != theirs.table ||
				ours.set != theirs.set || !slices.EqualFunc(ours.keys, theirs.keys, bytes.Equal) ||
				!slices.Equal(ours.listElemLen, theirs.listElemLen) {
				t.Errorf("v4 %v type %d:\n ours   %+v\n theirs %+v", v4, typ, ours, *theirs)
			}
		}
	}
}

// replyTo is an NLMSG_ERROR message answering seq with errno (0: an ack),
// capped as NETLINK_CAP_ACK makes the kernel send it.
func replyTo(seq uint32, errno unix.Errno) []byte {
	b := binary.NativeEndian.AppendUint32(nil, 36)
	b = binary.NativeEndian.AppendUint16(b, unix.NLMSG_ERROR)
	b = binary.NativeEndian.AppendUint16(b, unix.NLM_F_CAPPED)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 1234)
	b = binary.NativeEndian.AppendUint32(b, uint32(-int32(errno)))
	return append(b, make([]byte, 16)...) // the header of the message answered
}

// TestReplies feeds crafted kernel replies to the reply reader through a
// datagram socket pair.
func TestReplies(t *testing.T) {
	_, k4 := testKeys(3, true)
	var b batch
	b.begin(50)
	b.elements(unix.NFT_MSG_NEWSETELEM, "tcpmigrate_x", setV4, keyLen4, k4)
	b.elements(unix.NFT_MSG_DELSETELEM, "tcpmigrate_x", setV4, keyLen4, k4)
	b.elements(unix.NFT_MSG_NEWSETELEM, "tcpmigrate_x", setV6, keyLen6, nil)
	b.delTable("tcpmigrate_x")
	b.end()
	// Messages 51 (add v4), 52 (delete v4), 53 (delete table).
	for _, tc := range []struct {
		name    string
		replies [][]byte
		want    error  // nil, a sentinel or an errno
		text    string // in the error
	}{
		{"all acked", [][]byte{replyTo(51, 0), replyTo(52, 0), replyTo(53, 0)}, nil, ""},
		{"one failed", [][]byte{replyTo(51, 0), replyTo(52, unix.ENOENT), replyTo(53, 0)}, unix.ENOENT, "delete elements from set v4"},
		{"batch failed", [][]byte{replyTo(50, unix.ENOMEM)}, unix.ENOMEM, "batch"},
		{"commit failed", [][]byte{replyTo(50, unix.EBUSY), replyTo(51, 0), replyTo(52, 0), replyTo(53, 0)}, unix.EBUSY, "batch"},
		{"missing", [][]byte{replyTo(51, 0), replyTo(52, 0)}, errMissingReplies, "1 of 3"},
		{"stray", [][]byte{replyTo(51, 0), replyTo(7, 0)}, nil, "unknown message 7"},
		{"two in one datagram", [][]byte{slices.Concat(replyTo(51, 0), replyTo(52, 0)), replyTo(53, unix.EPERM)}, unix.EPERM, "delete table"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(fds[0])
			defer unix.Close(fds[1])
			for _, r := range tc.replies {
				if _, err := unix.Write(fds[1], r); err != nil {
					t.Fatal(err)
				}
			}
			s := &nfSocket{fd: fds[0], rbuf: make([]byte, 8192)}
			err = s.replies(&b)
			switch {
			case tc.want == nil && tc.text == "":
				if err != nil {
					t.Fatalf("replies: %v", err)
				}
			case tc.want != nil && !errors.Is(err, tc.want), err == nil, !strings.Contains(err.Error(), tc.text):
				t.Fatalf("replies: %v; want %v with %q", err, tc.want, tc.text)
			}
		})
	}
}

// TestElementsLen checks that the size reserved for a batch is enough and
// close: elements never outgrows it.
func TestElementsLen(t *testing.T) {
	for _, n := range []int{0, 1, 2339, 2340, 2341, 5000, 10000} {
		for _, v4 := range []bool{true, false} {
			_, keys := testKeys(n, v4)
			kl := keyLen4
			if !v4 {
				kl = keyLen6
			}
			table := "tcpmigrate_" + strings.Repeat("x", n%64)
			var b batch
			b.elements(unix.NFT_MSG_NEWSETELEM, table, setV4, kl, keys)
			want := elementsLen(len(table), kl, len(keys))
			if len(b.buf) > want || len(b.buf) < want-64 {
				t.Errorf("%d keys of %d bytes: %d bytes written, %d reserved", n, kl, len(b.buf), want)
			}
		}
	}
}
