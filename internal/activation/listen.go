package activation

import (
	"fmt"
	"net/netip"
	"strings"
)

// ListenerName returns the descriptor name of a listening socket bound to
// local (which may be the unspecified address):
//
//	name = ("listen4-" | "listen6-") endpoint
//
// with endpoint as in Name. The digit is the socket's family, which the
// address tells (an IPv6 socket's is IPv6, IPv4-mapped or not): a
// dual-stack IPv6 listener on [::]:80 is "listen6-.._80", and IPv4
// connections reach it with IPv4-mapped addresses.
func ListenerName(local netip.AddrPort) (string, error) {
	if !local.IsValid() {
		return "", fmt.Errorf("%w: listener %v: no address", ErrName, local)
	}
	var b strings.Builder
	if local.Addr().Is4() {
		b.WriteString("listen4-")
	} else {
		b.WriteString("listen6-")
	}
	appendEndpoint(&b, local)
	return b.String(), nil
}

// PendingName returns the descriptor name of a connection from local to
// remote that was waiting in the accept queue of the listener bound to
// listener (handshake done, not yet accepted by the program) when it moved:
//
//	name = ("pending4-" | "pending6-") endpoint "-" endpoint "-" endpoint
//	       (the listener's, then the connection's local and remote)
//
// The program serves it as if it had accepted it from that listener, whose
// own name is ListenerName of the same family and first endpoint.
func PendingName(listener, local, remote netip.AddrPort) (string, error) {
	conn, err := Name(local, remote)
	if err != nil {
		return "", err
	}
	v4 := local.Addr().Is4()
	if !listener.IsValid() || listener.Addr().Is4() != v4 {
		return "", fmt.Errorf("%w: pending connection %v -> %v: listener %v is of another family", ErrName, local, remote, listener)
	}
	var b strings.Builder
	b.WriteString("pending")
	b.WriteString(conn[3:4]) // the family digit of "tcp4-"/"tcp6-"
	b.WriteByte('-')
	appendEndpoint(&b, listener)
	b.WriteString(conn[4:])
	if b.Len() > MaxNameLen {
		return "", fmt.Errorf("%w: pending connection %v -> %v: the name would be %d bytes, at most %d allowed", ErrName, local, remote, b.Len(), MaxNameLen)
	}
	return b.String(), nil
}

// ParsePendingName decodes a name made by PendingName into the listener's
// address and the connection's. Anything else wraps ErrName.
func ParsePendingName(name string) (listener, local, remote netip.AddrPort, err error) {
	fam, rest, ok := strings.Cut(name, "-")
	if !ok || (fam != "pending4" && fam != "pending6") {
		return listener, local, remote, fmt.Errorf("%w: %q: it starts with neither \"pending4-\" nor \"pending6-\"", ErrName, name)
	}
	lep, conn, ok := strings.Cut(rest, "-")
	if !ok {
		return listener, local, remote, fmt.Errorf("%w: %q: no connection after the listener", ErrName, name)
	}
	// The listener's endpoint parses as the local end of a connection name.
	tcp := "tcp" + fam[len("pending"):] + "-"
	if listener, _, err = ParseName(tcp + lep + "-" + lep); err != nil {
		return listener, local, remote, fmt.Errorf("%w: %q: bad listener endpoint", ErrName, name)
	}
	if local, remote, err = ParseName(tcp + conn); err != nil {
		return listener, local, remote, err
	}
	return listener, local, remote, nil
}
