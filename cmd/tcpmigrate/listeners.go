package main

import (
	"slices"

	"github.com/tcpmigrate/tcpmigrate/internal/activation"
	"github.com/tcpmigrate/tcpmigrate/internal/procsock"
	"github.com/tcpmigrate/tcpmigrate/source"
	"github.com/tcpmigrate/tcpmigrate/target"
)

// deliveredName is the descriptor name of a delivered socket in
// LISTEN_FDNAMES and --deliver (docs/handoff-socket.md): a connection, a
// listener, or a connection pending on a listener.
func deliveredName(d *target.Delivered) (string, error) {
	switch {
	case d.Listener:
		return activation.ListenerName(d.Local)
	case d.PendingOn.IsValid():
		return activation.PendingName(d.PendingOn, d.Local, d.Remote)
	}
	return activation.Name(d.Local, d.Remote)
}

// pidListeners selects the listeners send --pid moves (those on --port
// when given) and drops their ports from the unused ones.
func pidListeners(socks []procsock.Socket, ports, unused []uint16) ([]procsock.Socket, []uint16) {
	ls := procsock.Listeners(socks, ports)
	unused = slices.DeleteFunc(unused, func(p uint16) bool {
		return slices.ContainsFunc(ls, func(s procsock.Socket) bool { return s.Local.Port() == p })
	})
	return ls, unused
}

// dupListeners copies the descriptors of a frozen process's listeners.
func dupListeners(pid int, ls []procsock.Socket) ([]source.Listener, error) {
	if len(ls) == 0 {
		return nil, nil
	}
	files, err := procsock.DupSockets(pid, ls)
	if err != nil {
		return nil, err
	}
	out := make([]source.Listener, len(files))
	for i, f := range files {
		out[i] = source.Listener{File: f, OwnerFD: ls[i].FD()}
	}
	return out, nil
}
