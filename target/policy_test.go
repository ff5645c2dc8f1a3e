package target

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// allFeatures is a kernel that has everything.
const allFeatures = repair.FeatRepair | repair.FeatRepairWindow | repair.FeatHalfClosed | repair.FeatTimestamp |
	repair.FeatUsecTS | repair.FeatRepairOffNoWP | repair.FeatBufLock | repair.FeatRawInject | repair.FeatMark

// goodSnapshot returns a snapshot of an established IPv4 connection that
// repair's Validate accepts, local 198.18.0.10:8080.
func goodSnapshot() *repair.Snapshot {
	return &repair.Snapshot{
		Local:  netip.MustParseAddrPort("198.18.0.10:8080"),
		Remote: netip.MustParseAddrPort("198.18.0.1:40000"),
		Family: unix.AF_INET, State: repair.StateEstablished,
		Flags:     repair.FlagWindow | repair.FlagSACK | repair.FlagWScale | repair.FlagTimestamps,
		SndWScale: 7, RcvWScale: 7, MSSClamp: 1460, Timestamp: 1000,
		SendSeq: 5000, RecvSeq: 9000,
		Window:    repair.Window{SndWl1: 9000, SndWnd: 64000, MaxWindow: 64000, RcvWnd: 64000, RcvWup: 9000},
		RecvQueue: []byte("hello"), SendQueue: []byte("world"), Unsent: 2,
		Options: repair.Options{SndBuf: 87040, RcvBuf: 131072, TTL: 64, KeepIdle: 7200, KeepIntvl: 75, KeepCnt: 9,
			RcvLowat: 1, Linger2: 60},
	}
}

func testPolicy() *Policy {
	return &Policy{Allow: []netip.Prefix{netip.MustParsePrefix("198.18.0.10/32"), netip.MustParsePrefix("fd00::10/128"),
		netip.MustParsePrefix("fe80::/64")},
		AllowPorts: []uint16{8080}, MaxQueueBytes: 1000}
}

// TestPolicyCheck runs one snapshot per kind of refusal through Check: each
// gets its verdict code and an error that names the cause, and the good one
// passes.
func TestPolicyCheck(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(s *repair.Snapshot)
		have   repair.Features
		code   transport.VerdictCode // 0: accepted
		is     error
		reason string
	}{
		{name: "good", mutate: func(*repair.Snapshot) {}},
		{name: "good, features unknown", mutate: func(s *repair.Snapshot) { s.Flags |= repair.FlagUsecTS }, have: 0},
		{name: "dual-stack mapped address", mutate: func(s *repair.Snapshot) {
			s.Family = unix.AF_INET6
			s.Local = netip.MustParseAddrPort("[::ffff:198.18.0.10]:8080")
			s.Remote = netip.MustParseAddrPort("[::ffff:198.18.0.1]:40000")
		}},
		{name: "outside the allow-list", mutate: func(s *repair.Snapshot) { s.Local = netip.MustParseAddrPort("198.18.0.3:8080") },
			code: transport.VerdictRefused, is: ErrNotAllowed, reason: "198.18.0.3 is not in the allow-list"},
		{name: "port not allowed", mutate: func(s *repair.Snapshot) { s.Local = netip.MustParseAddrPort("198.18.0.10:22") },
			code: transport.VerdictRefused, is: ErrNotAllowed, reason: "port 22"},
		{name: "bypass mark", mutate: func(s *repair.Snapshot) { s.Options.Mark = firewall.DefaultBypassMark },
			code: transport.VerdictRefused, is: ErrNotAllowed, reason: "bypass mark"},
		{name: "queues over the limit", mutate: func(s *repair.Snapshot) { s.RecvQueue = make([]byte, 996) },
			code: transport.VerdictLimit, is: ErrOverLimit, reason: "1001 bytes"},
		{name: "unsent beyond the send queue", mutate: func(s *repair.Snapshot) { s.Unsent = 6 },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "unsent 6"},
		{name: "wrong family", mutate: func(s *repair.Snapshot) { s.Family = unix.AF_INET6 },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "family"},
		{name: "unknown family", mutate: func(s *repair.Snapshot) { s.Family = 17 },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "family"},
		{name: "snd_wnd over max_window", mutate: func(s *repair.Snapshot) { s.Window.SndWnd = 70000 },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "max_window"},
		{name: "window the scale cannot express", mutate: func(s *repair.Snapshot) {
			s.SndWScale, s.Window.SndWnd, s.Window.MaxWindow = 1, 200000, 200000
		}, code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "scale 1"},
		{name: "not established", mutate: func(s *repair.Snapshot) { s.State = repair.StateSynSent },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "SYN_SENT"},
		{name: "connection to itself", mutate: func(s *repair.Snapshot) { s.Remote = s.Local },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "itself"},
		{name: "loopback peer", mutate: func(s *repair.Snapshot) { s.Remote = netip.MustParseAddrPort("127.0.0.1:40000") },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "loopback"},
		{name: "broadcast peer", mutate: func(s *repair.Snapshot) { s.Remote = netip.MustParseAddrPort("255.255.255.255:40000") },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "cannot be an end"},
		{name: "zone on a global address", mutate: func(s *repair.Snapshot) {
			s.Family = unix.AF_INET6
			s.Local = netip.MustParseAddrPort("[fd00::10%eth0]:8080")
			s.Remote = netip.MustParseAddrPort("[fd00::1]:40000")
		}, code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "zone"},
		{name: "overlong zone", mutate: func(s *repair.Snapshot) {
			s.Family = unix.AF_INET6
			s.Local = netip.MustParseAddrPort("[fe80::10%" + strings.Repeat("z", 16) + "]:8080")
			s.Remote = netip.MustParseAddrPort("[fe80::1]:40000")
		}, code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "zone"},
		{name: "keepalive out of range", mutate: func(s *repair.Snapshot) { s.Options.KeepIdle = 0 },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "keepalive"},
		{name: "TTL out of range", mutate: func(s *repair.Snapshot) { s.Options.TTL = 256 },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "TTL"},
		{name: "microsecond timestamps on a kernel without them", mutate: func(s *repair.Snapshot) { s.Flags |= repair.FlagUsecTS },
			have: allFeatures &^ repair.FeatUsecTS, code: transport.VerdictUnsupported, is: ErrUnsupported, reason: "usec-ts"},
		{name: "SO_BUF_LOCK on a kernel without it", mutate: func(s *repair.Snapshot) { s.Options.Mask |= repair.OptBufLock },
			have: allFeatures &^ repair.FeatBufLock, code: transport.VerdictUnsupported, is: ErrUnsupported, reason: "buf-lock"},
		{name: "half-closed", mutate: func(s *repair.Snapshot) { s.State = repair.StateCloseWait; s.Shutdown = repair.ShutRead }},
		{name: "half-closed on a kernel without it", mutate: func(s *repair.Snapshot) {
			s.State = repair.StateFinWait1
			s.Shutdown = repair.ShutWrite
			s.Flags |= repair.FlagFINUnsent
		},
			have: allFeatures &^ repair.FeatHalfClosed, code: transport.VerdictUnsupported, is: ErrUnsupported, reason: "half-closed"},
		{name: "crafted segments without raw sockets", mutate: func(s *repair.Snapshot) { s.State = repair.StateCloseWait },
			have: allFeatures &^ repair.FeatRawInject, code: transport.VerdictUnsupported, is: ErrUnsupported, reason: "raw-inject"},
		{name: "SYN_SENT with queued data", mutate: func(s *repair.Snapshot) { s.State = repair.StateSynSent },
			code: transport.VerdictInvalid, is: repair.ErrInvalidSnapshot, reason: "SYN_SENT"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := goodSnapshot()
			tc.mutate(s)
			have := tc.have
			if have == 0 && tc.name != "good, features unknown" {
				have = allFeatures
			}
			err := testPolicy().Check(s, nil, have)
			if tc.code == 0 {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			var r *Refusal
			if !errors.As(err, &r) {
				t.Fatalf("Check = %v, want a *Refusal", err)
			}
			if r.Code != tc.code || !errors.Is(err, tc.is) || !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("Check = %s: %v; want %s matching %v and saying %q", r.Code, err, tc.code, tc.is, tc.reason)
			}
		})
	}
}

// TestPolicyDefaults checks that a zero Policy refuses every address and
// applies the default queue limit.
func TestPolicyDefaults(t *testing.T) {
	var p Policy
	if err := p.Check(goodSnapshot(), nil, allFeatures); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("zero policy: %v, want ErrNotAllowed", err)
	}
	p.Allow = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}
	if err := p.Check(goodSnapshot(), nil, allFeatures); err != nil {
		t.Errorf("any address, any port: %v", err)
	}
	s := goodSnapshot()
	s.SendQueue, s.Unsent = nil, 0
	if err := p.Check(s, make([]byte, DefaultMaxQueueBytes+1), allFeatures); !errors.Is(err, ErrOverLimit) {
		t.Errorf("state over the default limit: %v, want ErrOverLimit", err)
	}
}

// TestAdmission checks the limits that span a migration: the byte budget
// of all connections and the 4-tuple that may come only once.
func TestAdmission(t *testing.T) {
	pol := testPolicy().withDefaults()
	pol.MaxBytes = 25 // two good snapshots (10 bytes each) and change
	a := newAdmission(&pol, allFeatures)
	s0, s1, s2 := goodSnapshot(), goodSnapshot(), goodSnapshot()
	s1.Remote = netip.MustParseAddrPort("198.18.0.1:40001")
	s2.Remote = netip.MustParseAddrPort("198.18.0.1:40002")
	if err := a.admit(0, s0, nil); err != nil {
		t.Fatal(err)
	}
	dup := goodSnapshot()
	dup.RecvQueue, dup.SendQueue, dup.Unsent = nil, nil, 0
	if err := a.admit(1, dup, nil); verdictOf(err) != transport.VerdictConflict || !errors.Is(err, ErrConflict) {
		t.Errorf("same 4-tuple again: %v", err)
	}
	if err := a.admit(2, s1, nil); err != nil {
		t.Fatal(err)
	}
	if err := a.admit(3, s2, nil); verdictOf(err) != transport.VerdictLimit || !errors.Is(err, ErrOverLimit) {
		t.Errorf("third connection over MaxBytes: %v", err)
	}
	if a.bytes != 20 {
		t.Errorf("admitted %d bytes, want 20", a.bytes)
	}
}

// TestAbortCode checks which Abort code each kind of failure sends.
func TestAbortCode(t *testing.T) {
	for err, want := range map[error]transport.AbortCode{
		ErrTimeout:                        transport.AbortTimeout,
		ErrReused:                         transport.AbortPolicy,
		&transport.LimitError{Limit: "x"}: transport.AbortPolicy,
		errors.New("restore failed"):      transport.AbortError,
	} {
		if got := abortCode(err); got != want {
			t.Errorf("abortCode(%v) = %s, want %s", err, got, want)
		}
	}
}
