package repair

import (
	"golang.org/x/sys/unix"
)

// presetOpt is an option a Blank can take before the freeze (Preset): a
// plain setting of the socket that means the same on a socket not yet
// connected as on a restored one, that changes nothing a later step of the
// restore does, and that the source reads before it locks (Inspect), so
// that its value is known ahead of the snapshot.
type presetOpt struct {
	level, name int
	what        string
	get         func(*Options) int32
	set         func(*Options, int32)
	// constDef is the value on a new socket when it does not follow a
	// sysctl (ok false: Defaults has it, or it is unknown).
	constDef int32
	constOK  bool
}

// presetOpts are the options Preset sets, in the order it sets them.
// SO_KEEPALIVE on a socket in CLOSE only sets the flag; the repair-mode
// connect starts the keepalive timer (tcp_finish_connect), as an option
// set after it does. TCP_NODELAY pushes nothing on an empty socket, and
// the unsent bytes a restore writes later meet the zero window of a
// repair connect either way. Left out on purpose: options that steer the
// route (SO_MARK, IP_TOS, SO_DONTROUTE, SO_BINDTODEVICE), the buffer sizes
// (a restore needs them inflated until its queues are in), TCP_CORK (it
// holds back the unsent bytes), TCP_NOTSENT_LOWAT (the never-sent bytes
// are written into a zero window, so past the mark the write would get
// EAGAIN), SO_PRIORITY (IP_TOS resets it) and SO_RCVLOWAT (it can grow
// the receive buffer).
var presetOpts = [...]presetOpt{
	{unix.IPPROTO_TCP, unix.TCP_NODELAY, "TCP_NODELAY",
		func(o *Options) int32 { return b2i(o.NoDelay) }, func(o *Options, v int32) { o.NoDelay = v != 0 }, 0, true},
	{unix.SOL_SOCKET, unix.SO_KEEPALIVE, "SO_KEEPALIVE",
		func(o *Options) int32 { return b2i(o.KeepAlive) }, func(o *Options, v int32) { o.KeepAlive = v != 0 }, 0, true},
	{unix.SOL_SOCKET, unix.SO_OOBINLINE, "SO_OOBINLINE",
		func(o *Options) int32 { return b2i(o.OOBInline) }, func(o *Options, v int32) { o.OOBInline = v != 0 }, 0, true},
	{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, "TCP_KEEPIDLE",
		func(o *Options) int32 { return o.KeepIdle }, func(o *Options, v int32) { o.KeepIdle = v }, 0, false},
	{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, "TCP_KEEPINTVL",
		func(o *Options) int32 { return o.KeepIntvl }, func(o *Options, v int32) { o.KeepIntvl = v }, 0, false},
	{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, "TCP_KEEPCNT",
		func(o *Options) int32 { return o.KeepCnt }, func(o *Options, v int32) { o.KeepCnt = v }, 0, false},
	{unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT",
		func(o *Options) int32 { return int32(o.UserTimeout) }, func(o *Options, v int32) { o.UserTimeout = uint32(v) }, 0, true},
}

// presetValues are the values a preset Blank's socket has for each of
// presetOpts, in that order.
type presetValues [len(presetOpts)]int32

// presetIndex returns the index in presetOpts of the option level/name.
func presetIndex(level, name int) (int, bool) {
	for i := range presetOpts {
		if presetOpts[i].level == level && presetOpts[i].name == name {
			return i, true
		}
	}
	return 0, false
}

// PresetOf returns the part of o that Restorer.Preset sets on a Blank: the
// presettable options with o's values, every other member zero. Options
// is comparable, so equal results can share one entry of a table (a
// source sends each distinct one once in PREPARE).
func PresetOf(o *Options) Options {
	var p Options
	for i := range presetOpts {
		presetOpts[i].set(&p, presetOpts[i].get(o))
	}
	return p
}

// Preset sets on b, before the freeze, the options of o that a socket can
// take before it is connected (TCP_NODELAY, SO_OOBINLINE, the keepalive
// settings, the user timeout: PresetOf), leaving alone those equal
// to a new socket's (Restorer.Defaults), and records them in b: the
// restore of a snapshot on b (RestoreBlank) then writes only the options
// whose value differs from o's, so that the snapshot always has the last
// word. o is the source's reading of the connection before its lock (the
// options a snapshot carries are read then too). On error b is closed.
func (r *Restorer) Preset(b *Blank, o *Options) error {
	if b == nil || !b.open {
		return &OpError{Op: "preset a blank socket", Err: unix.EBADF}
	}
	def := r.Defaults.of(b.family)
	var vals presetValues
	for i := range presetOpts {
		p := &presetOpts[i]
		v := p.get(o)
		vals[i] = v
		if have, ok := p.newSocket(def); ok && have == v {
			continue
		}
		if err := setIntRaw(b.fd, p.level, p.name, v); err != nil {
			b.Close()
			return &OpError{Op: "preset a blank socket: setsockopt " + p.what, Local: b.local, Err: err}
		}
	}
	b.preset, b.presetOK = vals, true
	return nil
}

// newSocket returns the value of p on a new socket of the family whose
// defaults are def, if known.
func (p *presetOpt) newSocket(def *Options) (int32, bool) {
	if p.constOK {
		return p.constDef, true
	}
	if def != nil {
		return p.get(def), true
	}
	return 0, false
}

// Preset returns the options Restorer.Preset gave b (the members PresetOf
// keeps; the others are zero), and false if it gave none: for a caller's
// logs and tests.
func (b *Blank) Preset() (Options, bool) {
	var o Options
	if b == nil || !b.presetOK {
		return o, false
	}
	for i := range presetOpts {
		presetOpts[i].set(&o, b.preset[i])
	}
	return o, true
}
