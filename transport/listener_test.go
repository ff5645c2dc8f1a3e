package transport

import (
	"errors"
	"net/netip"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// exampleListeners is a LISTENERS message with every field set.
func exampleListeners(id MigrationID) *Listeners {
	return &Listeners{Migration: id, Listeners: []ListenerSpec{
		{Listener: repair.Listener{Family: unix.AF_INET, Local: netip.MustParseAddrPort("198.18.0.10:80"), Backlog: 4096,
			ReuseAddr: true, ReusePort: true, FreeBind: true, Transparent: true, DeferAccept: 3, FastOpen: 16,
			SndBuf: 65536, RcvBuf: 131072, BufLock: 3, NoDelay: true, KeepAlive: true, KeepIdle: 60, KeepIntvl: 10,
			KeepCnt: 5, Mark: 7, BindToDevice: "eth0"}, Pending: []uint32{0, 5, 300}},
		{Listener: repair.Listener{Family: unix.AF_INET6, Local: netip.MustParseAddrPort("[::]:443"), Backlog: 128, V6Only: false}},
		{Listener: repair.Listener{Family: unix.AF_INET6, Local: netip.MustParseAddrPort("[fd00::10]:443"), Backlog: 1, V6Only: true},
			Pending: []uint32{1}},
	}}
}

func decodeListeners(b []byte) (*Listeners, error) {
	m, err := decodeMessage(phaseControl, MsgListeners, b)
	if err != nil {
		return nil, err
	}
	return m.(*Listeners), nil
}

// TestListenersRefused checks that the decoder refuses descriptions the
// target must not act on, with ErrMalformed.
func TestListenersRefused(t *testing.T) {
	for name, mut := range map[string]func(*Listeners){
		"none":           func(m *Listeners) { m.Listeners = nil },
		"family":         func(m *Listeners) { m.Listeners[0].Listener.Family = 3 },
		"port 0":         func(m *Listeners) { m.Listeners[0].Listener.Local = netip.MustParseAddrPort("198.18.0.10:0") },
		"no address":     func(m *Listeners) { m.Listeners[0].Listener.Local = netip.AddrPort{} },
		"v4 in AF_INET6": func(m *Listeners) { m.Listeners[2].Listener.Local = netip.MustParseAddrPort("198.18.0.1:1") },
		"backlog 0":      func(m *Listeners) { m.Listeners[1].Listener.Backlog = 0 },
		"huge backlog":   func(m *Listeners) { m.Listeners[1].Listener.Backlog = 1 << 30 },
		"device":         func(m *Listeners) { m.Listeners[0].Listener.BindToDevice = "../../etc" },
		"pending twice":  func(m *Listeners) { m.Listeners[1].Pending = []uint32{5} },
		"same endpoint":  func(m *Listeners) { m.Listeners[1] = m.Listeners[2]; m.Listeners[1].Pending = nil },
		"too many": func(m *Listeners) {
			for len(m.Listeners) <= MaxListeners {
				m.Listeners = append(m.Listeners, m.Listeners[1])
			}
		},
	} {
		m := exampleListeners(MigrationID{9})
		mut(m)
		_, err := decodeListeners(m.appendFields(nil))
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", name, err)
		}
	}
	if m, err := decodeListeners(exampleListeners(MigrationID{9}).appendFields(nil)); err != nil || !reflect.DeepEqual(m, exampleListeners(MigrationID{9})) {
		t.Fatalf("example: %+v, %v", m, err)
	}
}

// FuzzListeners decodes arbitrary LISTENERS bodies: whatever decodes is a
// valid description that re-encodes to itself.
func FuzzListeners(f *testing.F) {
	f.Add(exampleListeners(MigrationID{1}).appendFields(nil))
	one := &Listeners{Listeners: []ListenerSpec{{Listener: repair.Listener{Family: unix.AF_INET6,
		Local: netip.MustParseAddrPort("[fe80::1%eth0]:22"), Backlog: 5}}}}
	f.Add(one.appendFields(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeListeners(b)
		if err != nil {
			return
		}
		for i := range m.Listeners {
			if err := m.Listeners[i].Listener.Validate(); err != nil {
				t.Fatalf("decoded an invalid listener: %v", err)
			}
		}
		again, err := decodeListeners(m.appendFields(nil))
		if err != nil {
			t.Fatalf("re-encoded does not decode: %v", err)
		}
		if !reflect.DeepEqual(again, m) {
			t.Fatalf("round trip:\n got %+v\nwant %+v", again, m)
		}
	})
}
