package procsock

import (
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/nsdo"
	"github.com/tcpmigrate/tcpmigrate/repair"
)

// Listeners returns the listening sockets among socks (as List reports
// them, with ReasonListener) that send --pid moves: those on one of ports,
// or all of them when ports is empty. For a listener, Socket.SendQ is its
// backlog and RecvQ the length of its accept queue.
func Listeners(socks []Socket, ports []uint16) []Socket {
	var out []Socket
	for _, s := range socks {
		if s.State == repair.StateListen && len(s.FDs) > 0 && (len(ports) == 0 || slices.Contains(ports, s.Local.Port())) {
			out = append(out, s)
		}
	}
	return out
}

// Pending reports whether s is a connection waiting in the accept queue of
// one of listeners (as Listeners returns them): established, without a
// descriptor, on an address one of them listens for. send --pid takes such
// connections from the queue and moves them.
func Pending(s Socket, listeners []Socket) bool {
	if len(s.FDs) != 0 || (s.State != repair.StateEstablished && s.State != repair.StateSynRecv) {
		return false
	}
	return slices.ContainsFunc(listeners, func(l Socket) bool { return listensFor(l.Local, s.Local) })
}

// Handshakes counts the connections still in their handshake (request
// sockets, SYN_RECV) towards any of the listener addresses eps, in the
// network namespace whose descriptor is netns (0: the caller's). An
// unspecified listener address counts every address of its port; an IPv6
// one ([::]) IPv4 too, as a dual-stack listener would.
//
// The source agent waits for this to reach zero, with the listeners'
// SYNs locked, before it takes their accept queues: a handshake that
// completes later would land in an accept queue nobody reads.
func Handshakes(netns int, eps []netip.AddrPort) (int, error) {
	nl := -1
	err := nsdo.Do(netns, func() error {
		var err error
		nl, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
		return err
	})
	if err != nil {
		return 0, opErr("socket NETLINK_SOCK_DIAG", 0, -1, err)
	}
	defer unix.Close(nl)
	entries, err := dumpTCP(nl)
	if err != nil {
		return 0, opErr("sock_diag dump", 0, -1, err)
	}
	n := 0
	for _, e := range entries {
		if e.state != repair.StateSynRecv && e.state != repair.StateNewSynRecv {
			continue
		}
		if slices.ContainsFunc(eps, func(ep netip.AddrPort) bool { return listensFor(ep, e.local) }) {
			n++
		}
	}
	return n, nil
}

// listensFor reports whether a listener bound to ep receives connections
// to local.
func listensFor(ep, local netip.AddrPort) bool {
	if ep.Port() != local.Port() {
		return false
	}
	a, l := ep.Addr(), local.Addr()
	switch {
	case a.IsUnspecified() && a.Is6():
		return true
	case a.IsUnspecified():
		return l.Unmap().Is4()
	}
	return a.Unmap() == l.Unmap()
}
