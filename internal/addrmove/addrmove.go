package addrmove

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Config names one address on one device in one network namespace.
type Config struct {
	// Prefix is the service address with the prefix length it is configured
	// with, such as 198.18.0.100/24 or fd00::100/64. Host bits are kept: the
	// address is Prefix.Addr().
	Prefix netip.Prefix
	// Dev is the name of the device that carries the address, such as eth0.
	Dev string
	// NetNS is an open file descriptor of the network namespace to act in,
	// or 0 for the namespace of the calling thread. It stays owned by the
	// caller.
	NetNS int
}

func (c Config) validate() error {
	a := c.Prefix.Addr()
	switch {
	case !c.Prefix.IsValid():
		return fmt.Errorf("%w: no valid prefix", ErrInvalidConfig)
	case a.Is4In6():
		return fmt.Errorf("%w: IPv4-mapped address %s: give it as IPv4", ErrInvalidConfig, a)
	case a.IsUnspecified(), a.IsMulticast():
		return fmt.Errorf("%w: %s is not a unicast address", ErrInvalidConfig, a)
	case a.Zone() != "":
		return fmt.Errorf("%w: address %s has a zone", ErrInvalidConfig, a)
	case c.Dev == "" || len(c.Dev) >= unix.IFNAMSIZ:
		return fmt.Errorf("%w: device name %q", ErrInvalidConfig, c.Dev)
	case c.NetNS < 0:
		return fmt.Errorf("%w: namespace descriptor %d", ErrInvalidConfig, c.NetNS)
	}
	return nil
}

// Claim adds the address to the device and announces it to the LAN: three
// gratuitous ARP requests for IPv4, three unsolicited Neighbor Advertisements
// with the Override flag for IPv6 (see the package documentation for their
// form). IPv6 addresses are added with IFA_F_NODAD, so the address is usable
// when Claim returns.
//
// Claim is idempotent: if the address is already configured with the same
// prefix length it is not added again, but it is announced again. If it is
// configured with another prefix length, Claim changes nothing and returns
// ErrPrefixMismatch. A missing device is ErrNoDevice.
//
// ctx bounds the wait between announcements. If ctx ends after the address
// was added, Claim returns ctx's error and leaves the address configured;
// Release removes it.
func Claim(ctx context.Context, cfg Config) error {
	return opError(OpClaim, cfg, claim(ctx, cfg))
}

// Release removes the address from the device, whatever prefix length it is
// configured with there. Release is idempotent: an address that is not
// configured is not an error. A missing device is ErrNoDevice. Release sends
// nothing on the network, and returns ctx's error without changing anything
// if ctx has already ended.
//
// For IPv4, removing a primary address also removes the secondary addresses
// of its subnet unless the device has promote_secondaries set; a service
// address added by Claim next to a host address is secondary.
func Release(ctx context.Context, cfg Config) error {
	return opError(OpRelease, cfg, release(ctx, cfg))
}

// Present reports whether the address is configured on the device, with any
// prefix length. A missing device is ErrNoDevice.
func Present(cfg Config) (bool, error) {
	ok, err := present(cfg)
	return ok, opError(OpPresent, cfg, err)
}

// lookup checks cfg, opens netlink in its namespace, finds the device and
// the prefixes the address is configured with there. The caller closes h.
func lookup(ctx context.Context, cfg Config) (*netlink.Handle, netlink.Link, []netip.Prefix, error) {
	if err := cfg.validate(); err != nil {
		return nil, nil, nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, nil, err
	}
	h, link, err := open(cfg)
	if err != nil {
		return nil, nil, nil, err
	}
	have, err := configured(h, link, cfg.Prefix.Addr())
	if err != nil {
		h.Close()
		return nil, nil, nil, err
	}
	return h, link, have, nil
}

func claim(ctx context.Context, cfg Config) error {
	h, link, have, err := lookup(ctx, cfg)
	if err != nil {
		return err
	}
	defer h.Close()
	switch {
	case slices.Contains(have, cfg.Prefix):
	case len(have) > 0:
		return fmt.Errorf("%w: configured as %s", ErrPrefixMismatch, have[0])
	default:
		a := &netlink.Addr{IPNet: ipNet(cfg.Prefix)}
		if cfg.Prefix.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(link, a); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add address: %w", err)
		}
	}
	attrs := link.Attrs()
	if !announceable(attrs) {
		return nil
	}
	ifi := &net.Interface{
		Index:        attrs.Index,
		MTU:          attrs.MTU,
		Name:         attrs.Name,
		HardwareAddr: attrs.HardwareAddr,
		Flags:        attrs.Flags,
	}
	return inNetNS(cfg.NetNS, func() error {
		return announce(ctx, ifi, cfg.Prefix.Addr())
	})
}

func release(ctx context.Context, cfg Config) error {
	h, link, have, err := lookup(ctx, cfg)
	if err != nil {
		return err
	}
	defer h.Close()
	for _, p := range have {
		err := h.AddrDel(link, &netlink.Addr{IPNet: ipNet(p)})
		if err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("remove address %s: %w", p, err)
		}
	}
	return nil
}

func present(cfg Config) (bool, error) {
	h, _, have, err := lookup(context.Background(), cfg)
	if err != nil {
		return false, err
	}
	h.Close()
	return len(have) > 0, nil
}

// open returns a route netlink handle in cfg's namespace and the device.
func open(cfg Config) (*netlink.Handle, netlink.Link, error) {
	var (
		h   *netlink.Handle
		err error
	)
	if cfg.NetNS == 0 {
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
	} else {
		h, err = netlink.NewHandleAt(netns.NsHandle(cfg.NetNS), unix.NETLINK_ROUTE)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("open netlink in namespace: %w", err)
	}
	link, err := h.LinkByName(cfg.Dev)
	if err != nil {
		h.Close()
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
			return nil, nil, ErrNoDevice
		}
		return nil, nil, fmt.Errorf("look up device: %w", err)
	}
	return h, link, nil
}

// configured returns the prefixes with which addr is configured on link
// (usually none or one).
func configured(h *netlink.Handle, link netlink.Link, addr netip.Addr) ([]netip.Prefix, error) {
	family := unix.AF_INET
	if addr.Is6() {
		family = unix.AF_INET6
	}
	var (
		list []netlink.Addr
		err  error
	)
	// A dump that raced with a change is retried: its contents may be
	// inconsistent.
	for range 5 {
		list, err = h.AddrList(link, family)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var have []netip.Prefix
	for _, a := range list {
		if a.IPNet == nil {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || ip.Unmap() != addr {
			continue
		}
		bits, _ := a.Mask.Size()
		have = append(have, netip.PrefixFrom(addr, bits))
	}
	return have, nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{
		IP:   p.Addr().AsSlice(),
		Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
	}
}

// announceable reports whether announcements make sense on the device: it
// has an Ethernet-style hardware address and does ARP/ND at all.
func announceable(a *netlink.LinkAttrs) bool {
	return len(a.HardwareAddr) == 6 &&
		a.Flags&net.FlagLoopback == 0 &&
		a.RawFlags&unix.IFF_NOARP == 0
}
