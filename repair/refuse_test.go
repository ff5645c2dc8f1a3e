package repair

import (
	"errors"
	"net/netip"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// solo returns a throwaway namespace with only loopback, for tests that
// need sockets but no network.
func solo(t *testing.T) *lab.NS {
	t.Helper()
	return lab.NewTestNS(t, "solo")
}

// pair connects a client and an accepted server socket over loopback in ns;
// listenSetup and dialSetup run on the raw sockets before listen/connect.
func pair(t *testing.T, ns *lab.NS, proto int, listenSetup, dialSetup func(fd int) error) (cl, sv int) {
	t.Helper()
	err := ns.Do(func() error {
		ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		defer unix.Close(ln)
		if listenSetup != nil {
			if err := listenSetup(ln); err != nil {
				return err
			}
		}
		if err := unix.Bind(ln, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			return err
		}
		if err := unix.Listen(ln, 4); err != nil {
			return err
		}
		sa, _ := unix.Getsockname(ln)
		if cl, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, proto); err != nil {
			return err
		}
		if dialSetup != nil {
			if err := dialSetup(cl); err != nil {
				return err
			}
		}
		if err := unix.Connect(cl, sa); err != nil {
			return err
		}
		sv, _, err = unix.Accept4(ln, unix.SOCK_CLOEXEC)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(cl); unix.Close(sv) })
	return cl, sv
}

func wantRefusal(t *testing.T, ns *lab.NS, fd int, reason Reason, detail string) {
	t.Helper()
	var s Snapshot
	err := ns.Do(func() error { return Dump(fd, &s) })
	var ue *UnsupportedError
	if !errors.As(err, &ue) || !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Dump = %v, want an *UnsupportedError", err)
	}
	if ue.Reason != reason || ue.Detail != detail {
		t.Fatalf("refused with %s (%q), want %s (%q): %v", ue.Reason, ue.Detail, reason, detail, err)
	}
	if v, _ := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR); v != 0 {
		t.Fatal("a refused socket was left in repair mode")
	}
}

// TestRefusals checks that every connection this version cannot migrate is
// refused up front, with its reason, and left untouched.
func TestRefusals(t *testing.T) {
	ns := solo(t)
	t.Run("listen", func(t *testing.T) {
		var ln int
		ns.Do(func() (err error) {
			ln, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err == nil {
				unix.Bind(ln, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}})
				err = unix.Listen(ln, 1)
			}
			return err
		})
		defer unix.Close(ln)
		wantRefusal(t, ns, ln, ReasonState, "LISTEN")
	})
	t.Run("close, never connected", func(t *testing.T) {
		var fd int
		ns.Do(func() (err error) {
			fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			return err
		})
		defer unix.Close(fd)
		wantRefusal(t, ns, fd, ReasonState, "CLOSE, not connected")
	})
	t.Run("not tcp", func(t *testing.T) {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		wantRefusal(t, ns, fd, ReasonNotTCP, "protocol 17")
	})
	t.Run("repair already on", func(t *testing.T) {
		cl, _ := pair(t, ns, 0, nil, nil)
		if err := unix.SetsockoptInt(cl, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1); err != nil {
			t.Fatal(err)
		}
		var s Snapshot
		err := ns.Do(func() error { return Inspect(cl, &s) })
		var ue *UnsupportedError
		if !errors.As(err, &ue) || ue.Reason != ReasonRepairOn {
			t.Fatalf("Inspect = %v, want refusal %s", err, ReasonRepairOn)
		}
	})
	t.Run("mptcp", func(t *testing.T) {
		cl, _ := pair(t, ns, unix.IPPROTO_MPTCP, nil, nil)
		wantRefusal(t, ns, cl, ReasonMPTCP, "")
	})
	t.Run("tcp-md5", func(t *testing.T) {
		md5 := func(fd int) error { return setMD5Key(fd, netip.MustParseAddr("127.0.0.1"), "tcpmigrate-test") }
		cl, sv := pair(t, ns, 0, md5, md5)
		wantRefusal(t, ns, cl, ReasonMD5, "")
		wantRefusal(t, ns, sv, ReasonMD5, "")
	})
}

// setMD5Key installs a TCP-MD5 key for peer (struct tcp_md5sig).
func setMD5Key(fd int, peer netip.Addr, key string) error {
	var sig [216]byte
	sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&sig[0]))
	sa.Family = unix.AF_INET
	sa.Addr = peer.As4()
	*(*uint16)(unsafe.Pointer(&sig[130])) = uint16(len(key))
	copy(sig[136:], key)
	return setsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_MD5SIG, unsafe.Pointer(&sig[0]), uint32(len(sig)))
}

// TestRollback dumps a live connection and rolls it back on the source: the
// connection goes on where it was, and the peer sees no reset.
func TestRollback(t *testing.T) {
	h := newHosts(t, false)
	peerAP := netip.AddrPortFrom(h.peerAddr, peerPort)
	local := netip.AddrPortFrom(h.svc, 40002)
	src, peer := dialPeer(t, h, unix.AF_INET, local, peerAP, nil, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	})
	defer src.Close()
	defer peer.Close()
	stop := captureFlags(t, h.lan, peerPort, false)

	if err := writeStream(peer, 1, 0, 1000); err != nil {
		t.Fatal(err)
	}
	fd := fdOf(t, src)
	waitFor(t, "data at the source", 5*time.Second, func() bool {
		n, _ := unix.IoctlGetInt(fd, unix.SIOCINQ)
		return n == 1000
	})
	nftLock(t, h.src, local, peerAP, true, true)
	var s Snapshot
	if err := h.src.Do(func() error { return Dump(fd, &s) }); err != nil {
		t.Fatal(err)
	}
	// While held, the peer's data does not arrive.
	if err := writeStream(peer, 1, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	nftUnlock(t, h.src)
	if err := Resume(fd, &s); err != nil {
		t.Fatal(err)
	}
	if v, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR); v != 1 {
		t.Error("SO_REUSEADDR not put back after repair")
	}
	deadline := time.Now().Add(10 * time.Second)
	src.SetDeadline(deadline)
	peer.SetDeadline(deadline)
	if err := checkStream(src, 1, 0, 2000); err != nil {
		t.Fatal(err)
	}
	werr := make(chan error, 1)
	go func() { werr <- writeStream(src, 0, 0, 1<<20) }()
	if err := checkStream(peer, 0, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if segs := stop(); len(segs) != 0 {
		t.Errorf("capture saw RST or FIN: %v", segs)
	}
}

// TestValidate refuses snapshots whose parts contradict each other, naming
// the field, before any socket exists.
func TestValidate(t *testing.T) {
	good := Snapshot{
		Family: unix.AF_INET, State: StateEstablished, Flags: FlagWindow | FlagWScale | FlagSACK,
		Local: netip.MustParseAddrPort("198.18.0.10:80"), Remote: netip.MustParseAddrPort("198.18.0.1:5000"),
		SndWScale: 7, RcvWScale: 7, MSSClamp: 1460, SendSeq: 1000, RecvSeq: 5000,
		Window:    Window{SndWl1: 4999, SndWnd: 1000, MaxWindow: 2000, RcvWnd: 1000, RcvWup: 5000},
		SendQueue: make([]byte, 10), Unsent: 4,
	}
	if err := good.Validate(); err != nil {
		t.Fatalf("valid snapshot refused: %v", err)
	}
	for name, mutate := range map[string]func(s *Snapshot){
		"family":        func(s *Snapshot) { s.Family = unix.AF_INET6 },
		"state":         func(s *Snapshot) { s.State = StateListen },
		"wscale":        func(s *Snapshot) { s.SndWScale = 15 },
		"scale no flag": func(s *Snapshot) { s.Flags &^= FlagWScale },
		"unsent":        func(s *Snapshot) { s.Unsent = 11 },
		"max window":    func(s *Snapshot) { s.Window.MaxWindow = 10 },
		"rcv_wup":       func(s *Snapshot) { s.Window.RcvWup = 5001 },
		"snd_wl1":       func(s *Snapshot) { s.Window.SndWl1 = 7000 },
		"mss":           func(s *Snapshot) { s.MSSClamp = 0 },
		"flags":         func(s *Snapshot) { s.Flags |= 1 << 30 },
		"no window":     func(s *Snapshot) { s.Flags &^= FlagWindow },
		"timestamp":     func(s *Snapshot) { s.Timestamp = 2 },
		"port":          func(s *Snapshot) { s.Local = netip.MustParseAddrPort("198.18.0.10:0") },
		"shutdown":      func(s *Snapshot) { s.Shutdown = ShutWrite },
	} {
		s := good
		mutate(&s)
		err := s.Validate()
		if !errors.Is(err, ErrInvalidSnapshot) {
			t.Errorf("%s: Validate = %v, want ErrInvalidSnapshot", name, err)
			continue
		}
		if _, err := Restore(&s); !errors.Is(err, ErrInvalidSnapshot) {
			t.Errorf("%s: Restore = %v, want ErrInvalidSnapshot", name, err)
		}
	}
}

// TestProbe checks the features this machine's kernel must have for the
// tests above to mean anything.
func TestProbe(t *testing.T) {
	ns := solo(t)
	var c Capabilities
	if err := ns.Do(func() (err error) { c, err = Probe(); return err }); err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s: %s; congestion %v", c.Kernel, c.Features, c.Congestion)
	want := FeatRepair | FeatRepairWindow | FeatHalfClosed | FeatTimestamp | FeatRepairOffNoWP | FeatRawInject | FeatMark
	if !c.Features.Has(want) {
		t.Errorf("features %s, want at least %s", c.Features, want)
	}
	if c.Kernel == "" || len(c.Congestion) == 0 {
		t.Errorf("kernel %q, congestion %v: probe read nothing", c.Kernel, c.Congestion)
	}
}
