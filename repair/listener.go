package repair

import (
	"errors"
	"fmt"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Listener describes a listening TCP socket well enough to recreate it on
// another host with bind and listen. A listener cannot enter repair mode
// and has no sequence numbers: what moves is its address and options. Its
// accept queue (connections that finished the handshake but were not yet
// accepted) does not travel with it: the source accepts those and migrates
// them as connections (docs/protocol.md, LISTENERS).
//
// Listener is plain data.
type Listener struct {
	// Family is unix.AF_INET or unix.AF_INET6.
	Family uint16
	// Local is the bound address; it may be unspecified (0.0.0.0 or ::).
	Local netip.AddrPort
	// Backlog is the listen backlog (sk_max_ack_backlog, read with
	// sock_diag).
	Backlog uint32
	// V6Only is IPV6_V6ONLY (AF_INET6 only): false means dual-stack.
	V6Only bool
	// ReuseAddr and ReusePort are SO_REUSEADDR and SO_REUSEPORT.
	ReuseAddr, ReusePort bool
	// FreeBind and Transparent are IP(V6)_FREEBIND and IP(V6)_TRANSPARENT
	// as the program set them.
	FreeBind, Transparent bool
	// DeferAccept is TCP_DEFER_ACCEPT as read back, in seconds.
	DeferAccept uint32
	// FastOpen is the TCP_FASTOPEN queue length; 0 is off.
	FastOpen uint32
	// SndBuf and RcvBuf are the buffer sizes as getsockopt reports them
	// (twice what the program asked for); they are written back only when
	// BufLock says the program fixed them.
	SndBuf, RcvBuf uint32
	// BufLock holds the SO_BUF_LOCK bits (1 send, 2 receive): the sizes
	// the program fixed. Accepted connections inherit them.
	BufLock uint8
	// NoDelay is TCP_NODELAY (inherited by accepted connections).
	NoDelay bool
	// KeepAlive is SO_KEEPALIVE; KeepIdle, KeepIntvl (seconds) and
	// KeepCnt are the TCP_KEEP* values (inherited by accepted connections).
	KeepAlive                    bool
	KeepIdle, KeepIntvl, KeepCnt uint32
	// Mark is SO_MARK.
	Mark uint32
	// BindToDevice is the SO_BINDTODEVICE interface name, or "".
	BindToDevice string
}

// String returns "listen ADDR:PORT".
func (l *Listener) String() string { return "listen " + l.Local.String() }

// DescribeListener reads what Listen needs to recreate the listening socket
// fd. It runs in the socket's network namespace (the backlog is read with
// sock_diag) and changes nothing on the socket.
func DescribeListener(fd int, l *Listener) error {
	*l = Listener{}
	fail := func(op string, err error) error {
		return &OpError{Op: op, Local: l.Local, Err: err}
	}
	dom, err := getInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return fail("getsockopt SO_DOMAIN", err)
	}
	l.Family = uint16(dom)
	if l.Local, err = sockname(fd, false); err != nil {
		return fail("getsockname", err)
	}
	var ti tcpInfoHead
	if err := getInfo(fd, &ti); err != nil {
		return fail("getsockopt TCP_INFO", err)
	}
	if st := State(ti.State); st != StateListen {
		return fail("describe listener", fmt.Errorf("%w: state %s, not LISTEN", ErrUnsupported, st))
	}
	level, transparent, freebind := ipLevel(l.Family)
	type flag struct {
		level, name int
		what        string
		dst         *bool
	}
	flags := []flag{
		{unix.SOL_SOCKET, unix.SO_REUSEADDR, "SO_REUSEADDR", &l.ReuseAddr},
		{unix.SOL_SOCKET, unix.SO_REUSEPORT, "SO_REUSEPORT", &l.ReusePort},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, "SO_KEEPALIVE", &l.KeepAlive},
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, "TCP_NODELAY", &l.NoDelay},
		{level, freebind, "IP_FREEBIND", &l.FreeBind},
		{level, transparent, "IP_TRANSPARENT", &l.Transparent},
	}
	if l.Family == unix.AF_INET6 {
		flags = append(flags, flag{unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, "IPV6_V6ONLY", &l.V6Only})
	}
	for _, f := range flags {
		v, err := getInt(fd, f.level, f.name)
		if err != nil {
			return fail("getsockopt "+f.what, err)
		}
		*f.dst = v != 0
	}
	ints := []struct {
		level, name int
		what        string
		dst         *uint32
	}{
		{unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, "TCP_DEFER_ACCEPT", &l.DeferAccept},
		{unix.IPPROTO_TCP, unix.TCP_FASTOPEN, "TCP_FASTOPEN", &l.FastOpen},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, "TCP_KEEPIDLE", &l.KeepIdle},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, "TCP_KEEPINTVL", &l.KeepIntvl},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, "TCP_KEEPCNT", &l.KeepCnt},
		{unix.SOL_SOCKET, unix.SO_MARK, "SO_MARK", &l.Mark},
		{unix.SOL_SOCKET, unix.SO_SNDBUF, "SO_SNDBUF", &l.SndBuf},
		{unix.SOL_SOCKET, unix.SO_RCVBUF, "SO_RCVBUF", &l.RcvBuf},
	}
	for _, i := range ints {
		v, err := getInt(fd, i.level, i.name)
		if err != nil {
			return fail("getsockopt "+i.what, err)
		}
		*i.dst = uint32(v)
	}
	if v, err := getInt(fd, unix.SOL_SOCKET, unix.SO_BUF_LOCK); err == nil {
		l.BufLock = uint8(v) & 3
	} else if !errors.Is(err, unix.ENOPROTOOPT) {
		return fail("getsockopt SO_BUF_LOCK", err)
	}
	var dev [unix.IFNAMSIZ]byte
	n, err := getsockopt(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, unsafe.Pointer(&dev[0]), uint32(len(dev)))
	if err != nil {
		return fail("getsockopt SO_BINDTODEVICE", err)
	}
	l.BindToDevice = string(cstring(dev[:n]))
	info, err := sockDiag(fd, l.Family, l.Local, netip.AddrPortFrom(unspecified(l.Family), 0))
	if err != nil {
		return fail("sock_diag (backlog)", err)
	}
	l.Backlog = info.wqueue
	return nil
}

func unspecified(family uint16) netip.Addr {
	if family == unix.AF_INET6 {
		return netip.IPv6Unspecified()
	}
	return netip.IPv4Unspecified()
}

// Validate checks that l names a listener Listen can create: a known
// family, an address of that family (IPv4-mapped only for AF_INET6), a
// port, a backlog, and option values within the kernel's ranges.
func (l *Listener) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: listener %v: %s", ErrInvalidSnapshot, l.Local, fmt.Sprintf(format, a...))
	}
	a := l.Local.Addr()
	switch {
	case l.Family != unix.AF_INET && l.Family != unix.AF_INET6:
		return bad("family %d", l.Family)
	case !a.IsValid():
		return bad("no address")
	case l.Family == unix.AF_INET && !a.Is4():
		return bad("AF_INET with an IPv6 address")
	case l.Family == unix.AF_INET6 && a.Is4():
		return bad("AF_INET6 with a bare IPv4 address")
	case l.Family == unix.AF_INET && l.V6Only:
		return bad("IPV6_V6ONLY on an AF_INET socket")
	case l.Local.Port() == 0:
		return bad("port 0")
	case l.Backlog == 0 || l.Backlog > 1<<20:
		return bad("backlog %d outside 1 to %d", l.Backlog, 1<<20)
	case l.SndBuf > 1<<30 || l.RcvBuf > 1<<30:
		return bad("buffer sizes %d/%d over 1 GiB", l.SndBuf, l.RcvBuf)
	case l.BufLock > 3:
		return bad("SO_BUF_LOCK bits %#x", l.BufLock)
	case l.KeepIdle > 32767 || l.KeepIntvl > 32767 || l.KeepCnt > 127:
		return bad("keepalive values out of range")
	case l.DeferAccept > 1<<20 || l.FastOpen > 1<<20:
		return bad("TCP_DEFER_ACCEPT %d or TCP_FASTOPEN %d out of range", l.DeferAccept, l.FastOpen)
	case len(l.BindToDevice) >= unix.IFNAMSIZ:
		return bad("device name of %d bytes", len(l.BindToDevice))
	}
	for i := 0; i < len(l.BindToDevice); i++ {
		if c := l.BindToDevice[i]; c <= ' ' || c == '/' || c >= 0x7f {
			return bad("device name %q", l.BindToDevice)
		}
	}
	return nil
}

// PortHeld reports whether a socket of this host (of the calling thread's
// namespace) already holds the port of l on an address l would take: a
// listener, or a socket bound without SO_REUSEADDR. It binds, without
// listening, a probe socket with l's family, IPV6_V6ONLY and
// SO_BINDTODEVICE, with SO_REUSEADDR and IP_FREEBIND and without
// SO_REUSEPORT, and closes it: EADDRINUSE means held. Sockets in repair
// mode (connections being restored) never count.
//
// A listener recreated with SO_REUSEPORT where PortHeld is true would, if
// the holder is a listener of the same user with SO_REUSEPORT, join its
// group and take a share of its connections; Listen alone cannot tell.
func PortHeld(l *Listener) (bool, error) {
	if err := l.Validate(); err != nil {
		return false, err
	}
	fail := func(op string, err error) error {
		return &OpError{Op: "probe the port: " + op, Local: l.Local, Err: err}
	}
	fd, err := unix.Socket(int(l.Family), unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return false, fail("socket", err)
	}
	defer unix.Close(fd)
	level, _, freebind := ipLevel(l.Family)
	if l.Family == unix.AF_INET6 {
		if err := setInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, b2i(l.V6Only)); err != nil {
			return false, fail("setsockopt IPV6_V6ONLY", err)
		}
	}
	if err := setInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return false, fail("setsockopt SO_REUSEADDR", err)
	}
	if err := setInt(fd, level, freebind, 1); err != nil {
		return false, fail("setsockopt IP_FREEBIND", err)
	}
	if l.BindToDevice != "" {
		if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, l.BindToDevice); err != nil {
			return false, fail("setsockopt SO_BINDTODEVICE", err)
		}
	}
	switch err := bindRaw(fd, l.Family, l.Local); {
	case err == nil:
		return false, nil
	case errors.Is(err, unix.EADDRINUSE):
		return true, nil
	default:
		return false, fail("bind", err)
	}
}

// Listen creates the listening socket l describes and returns its
// descriptor (non-blocking, close-on-exec). The options go on before bind;
// if the local address is not on this host yet, bind is retried with
// IP_FREEBIND (IPV6_FREEBIND), which is cleared again afterwards unless
// the source had it: once bound, a listener receives the connections to
// its address as soon as the address becomes local (the switch).
//
// The caller keeps inbound SYNs away from the new listener (the firewall's
// listener lock) until the migration commits. On error no descriptor is
// left open.
func Listen(l *Listener) (fd int, err error) {
	if err := l.Validate(); err != nil {
		return -1, err
	}
	fail := func(op string, err error) error {
		return &OpError{Op: op, Local: l.Local, Err: err}
	}
	fd, err = unix.Socket(int(l.Family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return -1, fail("socket", err)
	}
	defer func() {
		if err != nil {
			unix.Close(fd)
			fd = -1
		}
	}()
	level, transparent, freebind := ipLevel(l.Family)
	type opt struct {
		level, name int
		what        string
		v           int32
		when        bool
	}
	early := []opt{
		{unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, "IPV6_V6ONLY", b2i(l.V6Only), l.Family == unix.AF_INET6},
		{unix.SOL_SOCKET, unix.SO_REUSEADDR, "SO_REUSEADDR", 1, l.ReuseAddr},
		{unix.SOL_SOCKET, unix.SO_REUSEPORT, "SO_REUSEPORT", 1, l.ReusePort},
		{level, freebind, "IP_FREEBIND", 1, l.FreeBind},
		{level, transparent, "IP_TRANSPARENT", 1, l.Transparent},
		{unix.SOL_SOCKET, unix.SO_MARK, "SO_MARK", int32(l.Mark), l.Mark != 0},
		{unix.SOL_SOCKET, unix.SO_SNDBUF, "SO_SNDBUF", int32(l.SndBuf / 2), l.BufLock&1 != 0},
		{unix.SOL_SOCKET, unix.SO_RCVBUF, "SO_RCVBUF", int32(l.RcvBuf / 2), l.BufLock&2 != 0},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, "SO_KEEPALIVE", 1, l.KeepAlive},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, "TCP_KEEPIDLE", int32(l.KeepIdle), l.KeepIdle != 0},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, "TCP_KEEPINTVL", int32(l.KeepIntvl), l.KeepIntvl != 0},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, "TCP_KEEPCNT", int32(l.KeepCnt), l.KeepCnt != 0},
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, "TCP_NODELAY", 1, l.NoDelay},
		{unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, "TCP_DEFER_ACCEPT", int32(l.DeferAccept), l.DeferAccept != 0},
	}
	for _, o := range early {
		if !o.when {
			continue
		}
		if err := setInt(fd, o.level, o.name, o.v); err != nil {
			return fd, fail("setsockopt "+o.what, err)
		}
	}
	if l.BindToDevice != "" {
		if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, l.BindToDevice); err != nil {
			return fd, fail("setsockopt SO_BINDTODEVICE", err)
		}
	}
	if err := bindRaw(fd, l.Family, l.Local); errors.Is(err, unix.EADDRNOTAVAIL) && !l.FreeBind && !l.Transparent {
		if err := setInt(fd, level, freebind, 1); err != nil {
			return fd, fail("setsockopt IP_FREEBIND (local address not on this host)", err)
		}
		if err := bindRaw(fd, l.Family, l.Local); err != nil {
			return fd, fail("bind (freebind)", err)
		}
		// Only bind looks at the flag: put the source's value back.
		if err := setInt(fd, level, freebind, 0); err != nil {
			return fd, fail("clear IP_FREEBIND", err)
		}
	} else if err != nil {
		return fd, fail("bind", err)
	}
	if l.FastOpen != 0 {
		if err := setInt(fd, unix.IPPROTO_TCP, unix.TCP_FASTOPEN, int32(l.FastOpen)); err != nil {
			return fd, fail("setsockopt TCP_FASTOPEN", err)
		}
	}
	if err := unix.Listen(fd, int(l.Backlog)); err != nil {
		return fd, fail("listen", err)
	}
	return fd, nil
}
