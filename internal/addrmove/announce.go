package addrmove

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/ndp"
	"github.com/mdlayher/packet"
	"golang.org/x/sys/unix"
)

// The announcements Claim sends: how many, and the pause between two.
const (
	announcements    = 3
	announceInterval = 5 * time.Millisecond
)

// closeDelay is how long after its announcements Claim's socket is closed:
// longer than the commit that follows a claim in a migration.
const closeDelay = 2 * time.Second

// etherTypeARP is the EtherType the ARP packet socket is bound to.
const etherTypeARP = 0x0806

// announce sends the announcements of addr on ifi, from the namespace of the
// calling thread.
//
// The socket is closed in the background, closeDelay after the
// announcements are out: closing a bound packet socket waits for an RCU
// grace period (8 to 24 ms measured, docs/performance.md), which would
// otherwise hold up Claim, and with it the switch of a migration, for
// nothing. Not at once either: a goroutine blocked in a system call keeps
// its P until the runtime's monitor takes it back, up to 10 ms later (more
// when it has been idle), and the commit that follows a claim needs every
// P (a 10,000-connection commit ran on one core for 20 ms while the other
// waited for a P held by this close). The cost moves, it does not go: a
// migration whose commit falls 2 s after another's claim can meet it.
// Meanwhile the socket queues the link's ARP (or ICMPv6) frames, which
// nobody reads, up to its receive buffer.
func announce(ctx context.Context, ifi *net.Interface, addr netip.Addr) error {
	open := openGARP
	if addr.Is6() {
		open = openUNA
	}
	send, c, err := open(ifi, addr)
	if err != nil {
		return err
	}
	defer time.AfterFunc(closeDelay, func() { c.Close() })
	pause := time.NewTimer(announceInterval)
	defer pause.Stop()
	for i := range announcements {
		if i > 0 {
			pause.Reset(announceInterval)
			select {
			case <-ctx.Done():
				return fmt.Errorf("announce (%d of %d sent): %w", i, announcements, ctx.Err())
			case <-pause.C:
			}
		}
		if err := send(); err != nil {
			return fmt.Errorf("announce (%d of %d sent): %w", i, announcements, err)
		}
	}
	return nil
}

// openGARP opens an ARP packet socket on ifi and returns a function that
// sends one gratuitous ARP request for addr: broadcast, sender and target
// protocol address addr, target hardware address zero.
func openGARP(ifi *net.Interface, addr netip.Addr) (func() error, io.Closer, error) {
	p, err := packet.Listen(ifi, packet.Raw, etherTypeARP, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("open ARP socket: %w", err)
	}
	c, err := arp.New(ifi, p)
	if err != nil {
		p.Close()
		return nil, nil, fmt.Errorf("open ARP socket: %w", err)
	}
	zero := make(net.HardwareAddr, len(ifi.HardwareAddr))
	msg, err := arp.NewPacket(arp.OperationRequest, ifi.HardwareAddr, addr, zero, addr)
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("build gratuitous ARP: %w", err)
	}
	send := func() error {
		if err := c.WriteTo(msg, ethernet.Broadcast); err != nil {
			return fmt.Errorf("send gratuitous ARP: %w", err)
		}
		return nil
	}
	return send, c, nil
}

// openUNA opens an ICMPv6 socket on ifi and returns a function that sends one
// unsolicited Neighbor Advertisement for addr to ff02::1. The socket is bound
// to addr itself; if that fails (the address is still tentative because
// someone else added it without nodad), to the device's link-local address.
func openUNA(ifi *net.Interface, addr netip.Addr) (func() error, io.Closer, error) {
	c, _, err := ndp.Listen(ifi, ndp.Addr(addr.String()))
	if err != nil {
		var err2 error
		c, _, err2 = ndp.Listen(ifi, ndp.LinkLocal)
		if err2 != nil {
			return nil, nil, fmt.Errorf("open ICMPv6 socket: %w", errors.Join(err, err2))
		}
	}
	msg := &ndp.NeighborAdvertisement{
		// As Linux does in its own unsolicited advertisements: a host
		// that forwards says it is a router, or peers that route through
		// it would drop it as their router.
		Router:        forwarding(ifi.Name),
		Override:      true,
		TargetAddress: addr,
		Options: []ndp.Option{&ndp.LinkLayerAddress{
			Direction: ndp.Target,
			Addr:      ifi.HardwareAddr,
		}},
	}
	send := func() error {
		if err := c.WriteTo(msg, nil, netip.IPv6LinkLocalAllNodes()); err != nil {
			return fmt.Errorf("send unsolicited neighbor advertisement: %w", err)
		}
		return nil
	}
	return send, c, nil
}

// forwarding reports whether IPv6 forwarding is on for the device, in the
// namespace of the calling thread. It reads false when that cannot be told.
func forwarding(dev string) bool {
	b, err := os.ReadFile("/proc/sys/net/ipv6/conf/" + dev + "/forwarding")
	return err == nil && bytes.Equal(bytes.TrimSpace(b), []byte("1"))
}

// inNetNS runs fn on an OS thread inside the network namespace fd, or on the
// calling goroutine when fd is 0 (the calling thread's namespace). The thread
// is a fresh one that enters the namespace and exits with fn, so neither the
// caller's thread nor any other goroutine ever runs in the namespace and
// nothing has to be switched back. It waits for fn to return.
func inNetNS(fd int, fn func() error) error {
	if fd == 0 {
		return fn()
	}
	done := make(chan error, 1)
	go func() {
		// Never unlocked: the runtime ends a locked thread when its
		// goroutine exits, and this one is in another namespace.
		runtime.LockOSThread()
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("enter network namespace: %w", os.NewSyscallError("setns", err))
			return
		}
		done <- fn()
	}()
	return <-done
}
