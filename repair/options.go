package repair

import (
	"errors"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// intOpt is one integer socket option carried between hosts.
type intOpt struct {
	level, name int
	what        string
	field       func(*Options) *int32
}

// Integer options read before the dump and written back at the end of the
// restore, in this order. Options that need special handling (buffers,
// linger, strings, timeouts, family-specific ones) are listed in code below.
var intOpts = []intOpt{
	{unix.SOL_SOCKET, unix.SO_PRIORITY, "SO_PRIORITY", func(o *Options) *int32 { return &o.Priority }},
	{unix.SOL_SOCKET, unix.SO_RCVLOWAT, "SO_RCVLOWAT", func(o *Options) *int32 { return &o.RcvLowat }},
	{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, "TCP_KEEPIDLE", func(o *Options) *int32 { return &o.KeepIdle }},
	{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, "TCP_KEEPINTVL", func(o *Options) *int32 { return &o.KeepIntvl }},
	{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, "TCP_KEEPCNT", func(o *Options) *int32 { return &o.KeepCnt }},
	{unix.IPPROTO_TCP, unix.TCP_LINGER2, "TCP_LINGER2", func(o *Options) *int32 { return &o.Linger2 }},
	{unix.IPPROTO_IP, unix.IP_TTL, "IP_TTL", func(o *Options) *int32 { return &o.TTL }},
}

// boolOpt is one on/off socket option.
type boolOpt struct {
	level, name int
	what        string
	field       func(*Options) *bool
}

var boolOpts = []boolOpt{
	{unix.SOL_SOCKET, unix.SO_REUSEPORT, "SO_REUSEPORT", func(o *Options) *bool { return &o.ReusePort }},
	{unix.SOL_SOCKET, unix.SO_KEEPALIVE, "SO_KEEPALIVE", func(o *Options) *bool { return &o.KeepAlive }},
	{unix.SOL_SOCKET, unix.SO_OOBINLINE, "SO_OOBINLINE", func(o *Options) *bool { return &o.OOBInline }},
	{unix.SOL_SOCKET, unix.SO_DONTROUTE, "SO_DONTROUTE", func(o *Options) *bool { return &o.DontRoute }},
	{unix.IPPROTO_TCP, unix.TCP_NODELAY, "TCP_NODELAY", func(o *Options) *bool { return &o.NoDelay }},
	{unix.IPPROTO_TCP, unix.TCP_CORK, "TCP_CORK", func(o *Options) *bool { return &o.Cork }},
}

// uintOpt is an unsigned option whose zero value means "not set".
type uintOpt struct {
	level, name int
	what        string
	field       func(*Options) *uint32
}

var uintOpts = []uintOpt{
	{unix.SOL_SOCKET, unix.SO_MARK, "SO_MARK", func(o *Options) *uint32 { return &o.Mark }},
	{unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT", func(o *Options) *uint32 { return &o.UserTimeout }},
	{unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, "TCP_NOTSENT_LOWAT", func(o *Options) *uint32 { return &o.NotSentLowat }},
}

// optional options exist only on some kernels (ENOPROTOOPT elsewhere).
type optionalOpt struct {
	level, name int
	what        string
	bit         OptMask
	field       func(*Options) *uint32
}

var optionalOpts = []optionalOpt{
	{unix.IPPROTO_TCP, unix.TCP_RTO_MIN_US, "TCP_RTO_MIN_US", OptRTOMin, func(o *Options) *uint32 { return &o.RTOMinUs }},
	{unix.IPPROTO_TCP, unix.TCP_RTO_MAX_MS, "TCP_RTO_MAX_MS", OptRTOMax, func(o *Options) *uint32 { return &o.RTOMaxMs }},
}

type linger struct{ onoff, secs int32 }

// readOptions reads the ordinary options of fd into o. It must run before
// repair is turned on: some getters answer differently under repair.
func readOptions(fd int, family uint16, o *Options) (op string, err error) {
	*o = Options{}
	if o.SndBuf, err = getInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF); err != nil {
		return "getsockopt SO_SNDBUF", err
	}
	if o.RcvBuf, err = getInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF); err != nil {
		return "getsockopt SO_RCVBUF", err
	}
	if v, err := getInt(fd, unix.SOL_SOCKET, unix.SO_BUF_LOCK); err == nil {
		o.BufLock, o.Mask = uint8(v), o.Mask|OptBufLock
	} else if !errors.Is(err, unix.ENOPROTOOPT) {
		return "getsockopt SO_BUF_LOCK", err
	}
	v, err := getInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR)
	if err != nil {
		return "getsockopt SO_REUSEADDR", err
	}
	o.ReuseAddr = v != 0
	for _, b := range boolOpts {
		v, err := getInt(fd, b.level, b.name)
		if err != nil {
			return "getsockopt " + b.what, err
		}
		*b.field(o) = v != 0
	}
	for _, i := range intOpts {
		if *i.field(o), err = getInt(fd, i.level, i.name); err != nil {
			return "getsockopt " + i.what, err
		}
	}
	for _, u := range uintOpts {
		v, err := getInt(fd, u.level, u.name)
		if err != nil {
			return "getsockopt " + u.what, err
		}
		*u.field(o) = uint32(v)
	}
	for _, p := range optionalOpts {
		v, err := getInt(fd, p.level, p.name)
		if errors.Is(err, unix.ENOPROTOOPT) {
			continue
		}
		if err != nil {
			return "getsockopt " + p.what, err
		}
		*p.field(o), o.Mask = uint32(v), o.Mask|p.bit
	}
	if v, err = getInt(fd, unix.IPPROTO_TCP, unix.TCP_TX_DELAY); err != nil {
		return "getsockopt TCP_TX_DELAY", err
	} else if v != 0 {
		o.TxDelayUs, o.Mask = uint32(v), o.Mask|OptTxDelay
	}
	if v, err = getInt(fd, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP); err != nil {
		return "getsockopt TCP_WINDOW_CLAMP", err
	}
	o.WindowClamp = uint32(v)

	var l linger
	if _, err := getsockopt(fd, unix.SOL_SOCKET, unix.SO_LINGER, unsafe.Pointer(&l), 8); err != nil {
		return "getsockopt SO_LINGER", err
	}
	if l.onoff != 0 {
		o.LingerSecs, o.Mask = l.secs, o.Mask|OptLinger
	}
	if o.SndTimeo, err = getTimeout(fd, unix.SO_SNDTIMEO); err != nil {
		return "getsockopt SO_SNDTIMEO", err
	}
	if o.RcvTimeo, err = getTimeout(fd, unix.SO_RCVTIMEO); err != nil {
		return "getsockopt SO_RCVTIMEO", err
	}
	if v, err = getInt(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF); err != nil {
		return "getsockopt SO_PEEK_OFF", err
	} else if v >= 0 {
		o.PeekOff, o.Mask = v, o.Mask|OptPeekOff
	}
	var rate uint64
	if _, err := getsockopt(fd, unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE, unsafe.Pointer(&rate), 8); err != nil {
		return "getsockopt SO_MAX_PACING_RATE", err
	} else if rate != ^uint64(0) {
		o.MaxPacingRate, o.Mask = rate, o.Mask|OptMaxPacingRate
	}

	var name [16]byte
	n, err := getsockopt(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, unsafe.Pointer(&name), 16)
	if err != nil {
		return "getsockopt SO_BINDTODEVICE", err
	}
	if dev := cstring(name[:n]); len(dev) > 0 {
		o.BindToDevice, o.Mask = string(dev), o.Mask|OptBindToDevice
	}
	name = [16]byte{}
	n, err = getsockopt(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION, unsafe.Pointer(&name), 16)
	if err != nil {
		return "getsockopt TCP_CONGESTION", err
	}
	o.Congestion, o.Mask = internCongestion(cstring(name[:n])), o.Mask|OptCongestion

	if v, err = getInt(fd, unix.IPPROTO_IP, unix.IP_TOS); err != nil {
		return "getsockopt IP_TOS", err
	}
	o.TOS = uint8(v)
	if v, err = getInt(fd, unix.IPPROTO_IP, unix.IP_RECVERR); err != nil {
		return "getsockopt IP_RECVERR", err
	} else if v != 0 {
		o.Mask |= OptRecvErr
	}
	if family == unix.AF_INET {
		return readIPOpts(fd, o, unix.IPPROTO_IP, unix.IP_TRANSPARENT, unix.IP_FREEBIND, unix.IP_MTU_DISCOVER)
	}
	if v, err = getInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY); err != nil {
		return "getsockopt IPV6_V6ONLY", err
	} else if v != 0 {
		o.Mask |= OptV6Only
	}
	if o.TClass, err = getInt(fd, unix.IPPROTO_IPV6, unix.IPV6_TCLASS); err != nil {
		return "getsockopt IPV6_TCLASS", err
	}
	if o.UnicastHops, err = getInt(fd, unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS); err != nil {
		return "getsockopt IPV6_UNICAST_HOPS", err
	}
	o.Mask |= OptTClass | OptUnicastHops
	if v, err = getInt(fd, unix.IPPROTO_IPV6, unix.IPV6_RECVERR); err != nil {
		return "getsockopt IPV6_RECVERR", err
	} else if v != 0 {
		o.Mask |= OptRecvErr
	}
	return readIPOpts(fd, o, unix.IPPROTO_IPV6, unix.IPV6_TRANSPARENT, unix.IPV6_FREEBIND, unix.IPV6_MTU_DISCOVER)
}

func readIPOpts(fd int, o *Options, level, transparent, freebind, mtu int) (string, error) {
	v, err := getInt(fd, level, transparent)
	if err != nil {
		return "getsockopt IP_TRANSPARENT", err
	}
	if v != 0 {
		o.Mask |= OptTransparent
	}
	if v, err = getInt(fd, level, freebind); err != nil {
		return "getsockopt IP_FREEBIND", err
	}
	if v != 0 {
		o.Mask |= OptFreebind
	}
	if o.MTUDiscover, err = getInt(fd, level, mtu); err != nil {
		return "getsockopt IP_MTU_DISCOVER", err
	}
	return "", nil
}

func getTimeout(fd, name int) (time.Duration, error) {
	var tv unix.Timeval
	if _, err := getsockopt(fd, unix.SOL_SOCKET, name, unsafe.Pointer(&tv), uint32(unsafe.Sizeof(tv))); err != nil {
		return 0, err
	}
	return time.Duration(tv.Sec)*time.Second + time.Duration(tv.Usec)*time.Microsecond, nil
}

func setTimeout(fd, name int, d time.Duration) error {
	tv := unix.NsecToTimeval(d.Nanoseconds())
	return setsockoptRaw(fd, unix.SOL_SOCKET, name, unsafe.Pointer(&tv), uint32(unsafe.Sizeof(tv)))
}

func cstring(b []byte) []byte {
	for i, c := range b {
		if c == 0 {
			return b[:i]
		}
	}
	return b
}

// knownCongestion avoids an allocation per dump for the usual algorithm names.
var knownCongestion = map[string]string{
	"cubic": "cubic", "reno": "reno", "bbr": "bbr", "dctcp": "dctcp", "htcp": "htcp",
	"vegas": "vegas", "westwood": "westwood", "bic": "bic", "highspeed": "highspeed",
}

func internCongestion(b []byte) string {
	if s, ok := knownCongestion[string(b)]; ok {
		return s
	}
	return string(b)
}

// writeEarlyOptions sets what must be in place before bind and connect:
// routing depends on the device and the mark, bind on v6only, transparent
// and freebind.
func writeEarlyOptions(fd int, family uint16, o *Options) (string, error) {
	if family == unix.AF_INET6 {
		if err := setIntRaw(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, b2i(o.Mask&OptV6Only != 0)); err != nil {
			return "setsockopt IPV6_V6ONLY", err
		}
	}
	return writeRouteOptions(fd, family, o)
}

// writeRouteOptions is writeEarlyOptions but IPV6_V6ONLY: the device, the
// mark, transparent and freebind, each only if the source socket set it.
func writeRouteOptions(fd int, family uint16, o *Options) (string, error) {
	if o.Mask&OptBindToDevice != 0 {
		if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, o.BindToDevice); err != nil {
			return "setsockopt SO_BINDTODEVICE", err
		}
	}
	if o.Mark != 0 {
		if err := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_MARK, int32(o.Mark)); err != nil {
			return "setsockopt SO_MARK", err
		}
	}
	level, tr, fb := ipLevel(family)
	if o.Mask&OptTransparent != 0 {
		if err := setIntRaw(fd, level, tr, 1); err != nil {
			return "setsockopt IP_TRANSPARENT", err
		}
	}
	if o.Mask&OptFreebind != 0 {
		if err := setIntRaw(fd, level, fb, 1); err != nil {
			return "setsockopt IP_FREEBIND", err
		}
	}
	return "", nil
}

func ipLevel(family uint16) (level, transparent, freebind int) {
	if family == unix.AF_INET6 {
		return unix.IPPROTO_IPV6, unix.IPV6_TRANSPARENT, unix.IPV6_FREEBIND
	}
	return unix.IPPROTO_IP, unix.IP_TRANSPARENT, unix.IP_FREEBIND
}

// writeLateOptions sets the remaining options while the socket is still in
// repair mode and locked, after the queues and the window are in place. The
// buffer sizes go back to the source's (the restore inflated them) and
// SO_BUF_LOCK to the source's bits, so autotuning stays on where it was.
func writeLateOptions(fd int, family uint16, o *Options, d *Defaults, preset *presetValues) (string, error) {
	def := d.of(family)
	// On a preset Blank (Restorer.Preset) an option of presetOpts is
	// written only if the snapshot's value differs from the one the socket
	// was given before the freeze, whatever a new socket would have. (So a
	// keepalive time equal to the namespace's default, after a preset that
	// said otherwise, is written: it reads back the same but no longer
	// follows the sysctl; the kernel takes no value meaning "the sysctl".)
	written := func(level, name int, v int32) (done bool, err error) {
		if preset == nil {
			return false, nil
		}
		i, ok := presetIndex(level, name)
		if !ok {
			return false, nil
		}
		if v == preset[i] {
			return true, nil
		}
		return true, setIntRaw(fd, level, name, v)
	}
	if err := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, o.SndBuf/2); err != nil {
		return "setsockopt SO_SNDBUFFORCE", err
	}
	if err := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, o.RcvBuf/2); err != nil {
		return "setsockopt SO_RCVBUFFORCE", err
	}
	if o.Mask&OptBufLock != 0 {
		if err := setIntRaw(fd, unix.SOL_SOCKET, unix.SO_BUF_LOCK, int32(o.BufLock)); err != nil {
			return "setsockopt SO_BUF_LOCK", err
		}
	}
	// An option whose default is a constant (not a sysctl) and that the
	// connection never changed is already right on the new socket: it is
	// not written again, which saves about half of this function's calls
	// for an ordinary connection, inside the freeze (docs/performance.md).
	// IP_TOS first: setting it also resets SO_PRIORITY, which follows.
	if o.TOS != 0 {
		if err := setIntRaw(fd, unix.IPPROTO_IP, unix.IP_TOS, int32(o.TOS)); err != nil {
			return "setsockopt IP_TOS", err
		}
	}
	for _, b := range boolOpts {
		if done, err := written(b.level, b.name, b2i(*b.field(o))); err != nil {
			return "setsockopt " + b.what, err
		} else if done {
			continue
		}
		if !*b.field(o) { // every one is off on a new socket
			continue
		}
		if err := setIntRaw(fd, b.level, b.name, 1); err != nil {
			return "setsockopt " + b.what, err
		}
	}
	for _, i := range intOpts {
		v := *i.field(o)
		if done, err := written(i.level, i.name, v); err != nil {
			return "setsockopt " + i.what, err
		} else if done {
			continue
		}
		d, ok := constDefault(i.name)
		if !ok && def != nil {
			d, ok = *i.field(def), true
		}
		if ok && v == d && !(i.name == unix.SO_PRIORITY && o.TOS != 0) {
			continue
		}
		if err := setIntRaw(fd, i.level, i.name, v); err != nil {
			return "setsockopt " + i.what, err
		}
	}
	for _, u := range uintOpts {
		if done, err := written(u.level, u.name, int32(*u.field(o))); err != nil {
			return "setsockopt " + u.what, err
		} else if done {
			continue
		}
		// SO_MARK went in before the bind (writeRouteOptions); the others
		// are 0 on a new socket.
		if u.level == unix.SOL_SOCKET && u.name == unix.SO_MARK || *u.field(o) == 0 {
			continue
		}
		if err := setIntRaw(fd, u.level, u.name, int32(*u.field(o))); err != nil {
			return "setsockopt " + u.what, err
		}
	}
	for _, p := range optionalOpts {
		if o.Mask&p.bit == 0 || def != nil && def.Mask&p.bit != 0 && *p.field(def) == *p.field(o) {
			continue
		}
		if err := setIntRaw(fd, p.level, p.name, int32(*p.field(o))); err != nil {
			return "setsockopt " + p.what, err
		}
	}
	if o.Mask&OptTxDelay != 0 {
		if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_TX_DELAY, int32(o.TxDelayUs)); err != nil {
			return "setsockopt TCP_TX_DELAY", err
		}
	}
	if o.WindowClamp != 0 {
		if err := setIntRaw(fd, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, int32(o.WindowClamp)); err != nil {
			return "setsockopt TCP_WINDOW_CLAMP", err
		}
	}
	if o.Mask&OptLinger != 0 {
		l := linger{1, o.LingerSecs}
		if err := setsockoptRaw(fd, unix.SOL_SOCKET, unix.SO_LINGER, unsafe.Pointer(&l), 8); err != nil {
			return "setsockopt SO_LINGER", err
		}
	}
	if o.SndTimeo != 0 {
		if err := setTimeout(fd, unix.SO_SNDTIMEO, o.SndTimeo); err != nil {
			return "setsockopt SO_SNDTIMEO", err
		}
	}
	if o.RcvTimeo != 0 {
		if err := setTimeout(fd, unix.SO_RCVTIMEO, o.RcvTimeo); err != nil {
			return "setsockopt SO_RCVTIMEO", err
		}
	}
	if o.Mask&OptMaxPacingRate != 0 {
		r := o.MaxPacingRate
		if err := setsockoptRaw(fd, unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE, unsafe.Pointer(&r), 8); err != nil {
			return "setsockopt SO_MAX_PACING_RATE", err
		}
	}
	if o.Mask&OptCongestion != 0 && o.Congestion != "" {
		if err := unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION, o.Congestion); err != nil {
			return "setsockopt TCP_CONGESTION " + o.Congestion, err
		}
	}
	level, recverr, mtu := unix.IPPROTO_IP, unix.IP_RECVERR, unix.IP_MTU_DISCOVER
	if family == unix.AF_INET6 {
		level, recverr, mtu = unix.IPPROTO_IPV6, unix.IPV6_RECVERR, unix.IPV6_MTU_DISCOVER
		if o.Mask&OptTClass != 0 {
			if err := setIntRaw(fd, level, unix.IPV6_TCLASS, o.TClass); err != nil {
				return "setsockopt IPV6_TCLASS", err
			}
		}
		if o.Mask&OptUnicastHops != 0 && !(def != nil && def.Mask&OptUnicastHops != 0 && def.UnicastHops == o.UnicastHops) {
			if err := setIntRaw(fd, level, unix.IPV6_UNICAST_HOPS, o.UnicastHops); err != nil {
				return "setsockopt IPV6_UNICAST_HOPS", err
			}
		}
	}
	if o.Mask&OptRecvErr != 0 {
		if err := setIntRaw(fd, level, recverr, 1); err != nil {
			return "setsockopt IP_RECVERR", err
		}
	}
	if def == nil || def.MTUDiscover != o.MTUDiscover {
		if err := setIntRaw(fd, level, mtu, o.MTUDiscover); err != nil {
			return "setsockopt IP_MTU_DISCOVER", err
		}
	}
	return "", nil
}

// Defaults are the options a new TCP socket has in one network namespace,
// by family: the values a restore need not write there. Most follow the
// namespace's sysctls (the keepalive times, TCP_LINGER2, IP_TTL,
// IP_MTU_DISCOVER, the RTO bounds, IPV6_UNICAST_HOPS) and without Defaults
// a restore writes them all, about eight system calls inside the freeze
// for an ordinary connection. An option left alone because it equals the
// default keeps following the sysctl on the new host, as it did on the
// source unless the application set it to that same value.
type Defaults struct {
	v4, v6 *Options
}

// ReadDefaults reads the options of a new IPv4 and a new IPv6 TCP socket of
// the calling thread's network namespace. A family this host cannot make a
// socket of has no defaults (every option of its connections is written).
func ReadDefaults() (*Defaults, error) {
	d := &Defaults{}
	var errs []error
	for _, family := range []uint16{unix.AF_INET, unix.AF_INET6} {
		fd, err := unix.Socket(int(family), unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		if err != nil {
			if !errors.Is(err, unix.EAFNOSUPPORT) {
				errs = append(errs, &OpError{Op: "read the defaults: socket", Err: err})
			}
			continue
		}
		o := new(Options)
		op, err := readOptions(fd, family, o)
		unix.Close(fd)
		if err != nil {
			errs = append(errs, &OpError{Op: "read the defaults: " + op, Err: err})
			continue
		}
		if family == unix.AF_INET {
			d.v4 = o
		} else {
			d.v6 = o
		}
	}
	return d, errors.Join(errs...)
}

// of returns the defaults of family, or nil.
func (d *Defaults) of(family uint16) *Options {
	switch {
	case d == nil:
		return nil
	case family == unix.AF_INET:
		return d.v4
	case family == unix.AF_INET6:
		return d.v6
	}
	return nil
}

// constDefault returns the value an integer option of intOpts has on a new
// socket, when that value is a constant rather than a sysctl of the
// namespace. The keepalive times, TCP_LINGER2 and IP_TTL follow sysctls:
// writeLateOptions writes them unless the Restorer's Defaults say the
// source's value is the one a new socket has here.
func constDefault(name int) (int32, bool) {
	switch name {
	case unix.SO_PRIORITY:
		return 0, true
	case unix.SO_RCVLOWAT:
		return 1, true
	}
	return 0, false
}

func b2i(b bool) int32 {
	if b {
		return 1
	}
	return 0
}
