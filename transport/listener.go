package transport

import (
	"net/netip"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// MaxListeners bounds the listeners of one LISTENERS message.
const MaxListeners = 1024

// ListenerSpec is one listening socket that moves with a migration: how to
// recreate it, and which of the migration's connections were taken from
// its accept queue (established, not yet accepted by the program). Those
// connections travel as ordinary snapshots; the target delivers them as
// pending accepts of this listener.
type ListenerSpec struct {
	// Listener describes the socket.
	Listener repair.Listener
	// Pending lists the indices (in the migration) of the connections
	// taken from its accept queue, in the order they were queued.
	Pending []uint32
}

var listenerTable = newTable("listener",
	uintField(1, "family", func(s *ListenerSpec) *uint16 { return &s.Listener.Family }),
	addrPortField(2, "local", func(s *ListenerSpec) *netip.AddrPort { return &s.Listener.Local }),
	uintField(3, "backlog", func(s *ListenerSpec) *uint32 { return &s.Listener.Backlog }),
	boolField(4, "v6only", func(s *ListenerSpec) *bool { return &s.Listener.V6Only }),
	boolField(5, "reuseaddr", func(s *ListenerSpec) *bool { return &s.Listener.ReuseAddr }),
	boolField(6, "reuseport", func(s *ListenerSpec) *bool { return &s.Listener.ReusePort }),
	boolField(7, "freebind", func(s *ListenerSpec) *bool { return &s.Listener.FreeBind }),
	boolField(8, "transparent", func(s *ListenerSpec) *bool { return &s.Listener.Transparent }),
	uintField(9, "defer_accept", func(s *ListenerSpec) *uint32 { return &s.Listener.DeferAccept }),
	uintField(10, "fastopen", func(s *ListenerSpec) *uint32 { return &s.Listener.FastOpen }),
	uintField(11, "sndbuf", func(s *ListenerSpec) *uint32 { return &s.Listener.SndBuf }),
	uintField(12, "rcvbuf", func(s *ListenerSpec) *uint32 { return &s.Listener.RcvBuf }),
	uintField(13, "buf_lock", func(s *ListenerSpec) *uint8 { return &s.Listener.BufLock }),
	boolField(14, "nodelay", func(s *ListenerSpec) *bool { return &s.Listener.NoDelay }),
	boolField(15, "keepalive", func(s *ListenerSpec) *bool { return &s.Listener.KeepAlive }),
	uintField(16, "keepidle", func(s *ListenerSpec) *uint32 { return &s.Listener.KeepIdle }),
	uintField(17, "keepintvl", func(s *ListenerSpec) *uint32 { return &s.Listener.KeepIntvl }),
	uintField(18, "keepcnt", func(s *ListenerSpec) *uint32 { return &s.Listener.KeepCnt }),
	uintField(19, "mark", func(s *ListenerSpec) *uint32 { return &s.Listener.Mark }),
	stringField(20, "bind_to_device", func(s *ListenerSpec) *string { return &s.Listener.BindToDevice }),
	uint32sField(21, "pending", func(s *ListenerSpec) *[]uint32 { return &s.Pending }),
)

// Listeners announces the listening sockets that move with a migration
// (source → target), after Prepare and before Switch. The target checks
// each against its policy, recreates the allowed ones (bound, listening,
// with inbound SYNs dropped by its listener lock until the commit) and
// answers with ListenersReady. Version 2 only: a version-1 peer does not
// know the message.
type Listeners struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Listeners are the sockets; a verdict's Index is a position here.
	Listeners []ListenerSpec
}

var listenersTable = newTable("listeners",
	fixedField(1, "migration", 16, func(m *Listeners) []byte { return m.Migration[:] }),
	nestedListField(2, "listener", listenerTable, func(m *Listeners) *[]ListenerSpec { return &m.Listeners }),
)

// ListenersReady answers Listeners (target → source) with one verdict per
// listener, indexed by its position in Listeners. A listener that is not
// VerdictOK fails the whole migration: the source aborts it and rolls
// every connection back (docs/protocol.md §6.1).
type ListenersReady struct {
	// Migration is the migration's ID.
	Migration MigrationID
	// Verdicts has one verdict per listener.
	Verdicts []Verdict
}

var listenersReadyTable = newTable("listeners-ready",
	fixedField(1, "migration", 16, func(m *ListenersReady) []byte { return m.Migration[:] }),
	nestedListField(2, "verdict", verdictTable, func(m *ListenersReady) *[]Verdict { return &m.Verdicts }),
)

// Type returns MsgListeners.
func (*Listeners) Type() MsgType { return MsgListeners }

// Type returns MsgListenersReady.
func (*ListenersReady) Type() MsgType { return MsgListenersReady }

func (m *Listeners) appendFields(b []byte) []byte { return listenersTable.appendFields(b, m) }
func (m *ListenersReady) appendFields(b []byte) []byte {
	return listenersReadyTable.appendFields(b, m)
}

func (m *Listeners) decodeFields(b []byte) error {
	if err := listenersTable.decode(m, b); err != nil {
		return err
	}
	return m.validate()
}

func (m *ListenersReady) decodeFields(b []byte) error {
	if err := listenersReadyTable.decode(m, b); err != nil {
		return err
	}
	return validateVerdicts("listeners-ready", m.Verdicts)
}

// validate checks what a receiver needs before acting on the message: a
// bounded number of listeners, each a valid description
// (repair.Listener.Validate), no endpoint twice, and no connection index
// claimed twice. Whether the indices exist, and whether policy allows the
// addresses, is the target's to check.
func (m *Listeners) validate() error {
	if len(m.Listeners) == 0 || len(m.Listeners) > MaxListeners {
		return malformedf("listeners: %d listeners, want 1 to %d", len(m.Listeners), MaxListeners)
	}
	seen := map[uint32]bool{}
	type endpoint struct {
		family uint16
		local  netip.AddrPort
	}
	eps := map[endpoint]bool{}
	for i := range m.Listeners {
		s := &m.Listeners[i]
		if err := s.Listener.Validate(); err != nil {
			return malformedf("listeners: listener %d: %v", i, err)
		}
		ep := endpoint{s.Listener.Family, s.Listener.Local}
		if eps[ep] && !s.Listener.ReusePort {
			return malformedf("listeners: %v twice", s.Listener.Local)
		}
		eps[ep] = true
		for _, p := range s.Pending {
			if seen[p] {
				return malformedf("listeners: connection %d pending on two listeners", p)
			}
			seen[p] = true
		}
	}
	return nil
}
