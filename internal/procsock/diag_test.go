package procsock

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// diagMsg builds one SOCK_DIAG_BY_FAMILY message as the kernel lays it out.
func diagMsg(seq uint32, family uint8, st repair.State, l, r netip.AddrPort, cookie uint64, inode, rq, wq uint32) []byte {
	ne := binary.NativeEndian
	b := make([]byte, unix.NLMSG_HDRLEN+inetDiagMsgLen+8) // and one attribute
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint32(b[8:], seq)
	m := b[unix.NLMSG_HDRLEN:]
	m[0], m[1] = family, uint8(st)
	binary.BigEndian.PutUint16(m[4:], l.Port())
	binary.BigEndian.PutUint16(m[6:], r.Port())
	la, ra := l.Addr().As16(), r.Addr().As16()
	if family == unix.AF_INET {
		v4l, v4r := l.Addr().As4(), r.Addr().As4()
		copy(la[:], v4l[:])
		copy(ra[:], v4r[:])
	}
	copy(m[8:24], la[:])
	copy(m[24:40], ra[:])
	ne.PutUint32(m[44:], uint32(cookie))
	ne.PutUint32(m[48:], uint32(cookie>>32))
	ne.PutUint32(m[56:], rq)
	ne.PutUint32(m[60:], wq)
	ne.PutUint32(m[68:], inode)
	ne.PutUint16(m[72:], 5) // INET_DIAG_SHUTDOWN, ignored
	ne.PutUint16(m[74:], 8)
	return b
}

func done(seq uint32) []byte {
	b := make([]byte, unix.NLMSG_HDRLEN+4)
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], unix.NLMSG_DONE)
	binary.NativeEndian.PutUint32(b[8:], seq)
	return b
}

func TestParseDump(t *testing.T) {
	l4, r4 := netip.MustParseAddrPort("198.18.0.1:40000"), netip.MustParseAddrPort("198.18.0.2:80")
	l6, r6 := netip.MustParseAddrPort("[fd00::1]:40001"), netip.MustParseAddrPort("[::ffff:198.18.0.2]:443")
	var b []byte
	b = append(b, diagMsg(7, unix.AF_INET, repair.StateEstablished, l4, r4, 0x1122334455667788, 4242, 10, 20)...)
	b = append(b, diagMsg(6, unix.AF_INET, repair.StateListen, l4, r4, 1, 1, 0, 0)...) // stale sequence
	b = append(b, diagMsg(7, unix.AF_INET6, repair.StateTimeWait, l6, r6, 99, 0, 0, 0)...)
	got, complete, err := parseDump(b, 7, nil)
	if err != nil || complete || len(got) != 2 {
		t.Fatalf("parseDump: %d entries, done %v, %v", len(got), complete, err)
	}
	want := []diagEntry{
		{family: unix.AF_INET, state: repair.StateEstablished, local: l4, remote: r4, cookie: 0x1122334455667788, inode: 4242, recvQ: 10, sendQ: 20},
		{family: unix.AF_INET6, state: repair.StateTimeWait, local: l6, remote: r6, cookie: 99},
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	got, complete, err = parseDump(done(7), 7, got)
	if err != nil || !complete || len(got) != 2 {
		t.Errorf("NLMSG_DONE: %d entries, done %v, %v", len(got), complete, err)
	}
	e := done(7)
	binary.NativeEndian.PutUint16(e[4:], unix.NLMSG_ERROR)
	errno := -int32(unix.EPERM)
	binary.NativeEndian.PutUint32(e[unix.NLMSG_HDRLEN:], uint32(errno))
	if _, _, err := parseDump(e, 7, nil); err != unix.EPERM {
		t.Errorf("NLMSG_ERROR EPERM: %v", err)
	}
	if _, _, err := parseDump(b[:unix.NLMSG_HDRLEN+10], 7, nil); err != unix.EBADMSG {
		t.Errorf("truncated message: %v, want EBADMSG", err)
	}
}

func FuzzParseDump(f *testing.F) {
	f.Add(diagMsg(1, unix.AF_INET6, repair.StateEstablished,
		netip.MustParseAddrPort("[fd00::1]:1"), netip.MustParseAddrPort("[fd00::2]:2"), 3, 4, 5, 6))
	f.Add(done(1))
	f.Fuzz(func(t *testing.T, b []byte) {
		out, _, _ := parseDump(b, 1, nil)
		for _, e := range out {
			if e.family != unix.AF_INET && e.family != unix.AF_INET6 {
				t.Errorf("entry of family %d", e.family)
			}
		}
	})
}
