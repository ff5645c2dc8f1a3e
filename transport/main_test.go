package transport

import (
	mrand "math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// randSnapshot returns a snapshot with every field set to a random value
// and queues of the given sizes (nil when zero).
func randSnapshot(rng *mrand.Rand, recvLen, sendLen int) *repair.Snapshot {
	s := &repair.Snapshot{
		Family:    10,
		State:     repair.State(1 + rng.IntN(11)),
		Flags:     repair.Flags(rng.Uint32() & 0x3f),
		Shutdown:  repair.Shutdown(rng.IntN(4)),
		SndWScale: uint8(rng.IntN(15)),
		RcvWScale: uint8(rng.IntN(15)),
		MSSClamp:  uint32(536 + rng.IntN(9000)),
		Timestamp: rng.Uint32(),
		SendSeq:   rng.Uint32(),
		RecvSeq:   rng.Uint32(),
		Window: repair.Window{SndWl1: rng.Uint32(), SndWnd: rng.Uint32(), MaxWindow: rng.Uint32(),
			RcvWnd: rng.Uint32(), RcvWup: rng.Uint32()},
		Options: repair.Options{
			Mask: repair.OptMask(rng.Uint32()), SndBuf: rng.Int32(), RcvBuf: -rng.Int32(), BufLock: 3,
			ReuseAddr: true, ReusePort: rng.IntN(2) == 0, KeepAlive: true, KeepIdle: 7200, KeepIntvl: -75,
			KeepCnt: 9, NoDelay: true, Cork: rng.IntN(2) == 0, OOBInline: true, DontRoute: true,
			LingerSecs: 30, Mark: rng.Uint32(), Priority: -6, RcvLowat: 1,
			SndTimeo: time.Duration(rng.Int64()), RcvTimeo: -time.Second, BindToDevice: "eth0",
			PeekOff: -1, UserTimeout: 30000, Congestion: "bbr", NotSentLowat: 16384,
			WindowClamp: rng.Uint32(), Linger2: -1, RTOMinUs: 200000, RTOMaxMs: 120000,
			TxDelayUs: 5, MaxPacingRate: rng.Uint64(), TOS: 0x10, TTL: 64, TClass: 0x20,
			UnicastHops: 255, MTUDiscover: 1,
		},
	}
	if rng.IntN(2) == 0 {
		s.Local = netip.MustParseAddrPort("[::ffff:198.18.0.2]:443")
		s.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 1, byte(rng.IntN(256))}), uint16(rng.Uint32()))
	} else {
		s.Local = netip.MustParseAddrPort("[fe80::1%eth0]:8080")
		s.Remote = netip.AddrPortFrom(netip.MustParseAddr("fd00::7"), uint16(rng.Uint32()))
	}
	if recvLen > 0 {
		s.RecvQueue = make([]byte, recvLen)
		fillQueue(rng, s.RecvQueue)
	}
	if sendLen > 0 {
		s.SendQueue = make([]byte, sendLen)
		fillQueue(rng, s.SendQueue)
		s.Unsent = uint32(rng.IntN(sendLen + 1))
	}
	return s
}

// fillQueue fills p with data that compresses about 2:1 with zstd's fastest
// level: runs of 256 to 767 bytes, two in five random, the others text-like
// (HTTP and JSON made of a small vocabulary, about 6:1 on its own).
func fillQueue(rng *mrand.Rand, p []byte) {
	words := []string{"GET ", "/api/v1/", "items", "?id=", "HTTP/1.1\r\n", "Host: ", "example.com",
		"\r\n", "Content-Type: ", "application/json", "{\"name\":", "\"value\",", "\"count\":",
		"12345,", "true}", "Accept-Encoding: gzip\r\n", "user", "session=", "; ", "X-Request-Id: "}
	for i := 0; i < len(p); {
		n := min(len(p)-i, 256+rng.IntN(512))
		if rng.IntN(5) < 2 {
			for j := i; j < i+n; j++ {
				p[j] = byte(rng.Uint32())
			}
		} else {
			for j := i; j < i+n; {
				j += copy(p[j:i+n], words[rng.IntN(len(words))])
			}
		}
		i += n
	}
}
