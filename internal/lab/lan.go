package lab

import (
	"errors"
	"fmt"
	"net/netip"
)

// LAN is a switch namespace holding a bridge, and hosts that each hang off
// it by a veth (eth0 in the host, a port named after the host in the switch).
type LAN struct {
	Switch *NS
	Hosts  map[string]*NS
}

// NewLAN builds a switch and one host namespace per label. Nothing is
// addressed yet; use Host(...).Addr. On error everything built is removed.
func NewLAN(labels ...string) (*LAN, error) {
	sw, err := NewNS("sw")
	if err != nil {
		return nil, err
	}
	l := &LAN{Switch: sw, Hosts: map[string]*NS{}}
	err = sw.IP("link", "add", "br0", "type", "bridge")
	if err == nil {
		err = sw.IP("link", "set", "br0", "up")
	}
	for i, label := range labels {
		if err != nil {
			break
		}
		var h *NS
		h, err = NewNS(label)
		if err != nil {
			break
		}
		l.Hosts[label] = h
		port := fmt.Sprintf("p%d", i)
		if err = Veth(h, "eth0", sw, port); err != nil {
			break
		}
		err = sw.IP("link", "set", port, "master", "br0")
	}
	if err != nil {
		return nil, errors.Join(err, l.Close())
	}
	return l, nil
}

// Host returns the namespace of the host with that label.
func (l *LAN) Host(label string) *NS { return l.Hosts[label] }

// Close deletes every namespace of the LAN.
func (l *LAN) Close() error {
	var errs []error
	for _, h := range l.Hosts {
		errs = append(errs, h.Close())
	}
	errs = append(errs, l.Switch.Close())
	return errors.Join(errs...)
}

// AddAddr puts prefix (such as 198.18.0.1/24) on the host's eth0. IPv6
// addresses are added with nodad so that they are usable at once.
func (n *NS) AddAddr(prefix netip.Prefix) error {
	args := []string{"addr", "add", prefix.String(), "dev", "eth0"}
	if prefix.Addr().Is6() {
		args = append(args, "nodad")
	}
	return n.IP(args...)
}

// DelAddr removes prefix from the host's eth0.
func (n *NS) DelAddr(prefix netip.Prefix) error {
	return n.IP("addr", "del", prefix.String(), "dev", "eth0")
}

// FlushNeigh forgets the host's neighbour entries for addr, as a gratuitous
// ARP or unsolicited neighbour advertisement would replace them.
func (n *NS) FlushNeigh(addr netip.Addr) error {
	return n.IP("neigh", "flush", "to", addr.String(), "dev", "eth0")
}
