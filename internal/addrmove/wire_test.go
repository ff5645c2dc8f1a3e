package addrmove_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/ndp"
	"github.com/mdlayher/packet"
	"golang.org/x/net/ipv6"

	"github.com/tcpmigrate/tcpmigrate/internal/addrmove"
)

// wantAnnouncements is the number of announcements the package documents.
const wantAnnouncements = 3

// TestGratuitousARPForm captures, on the peer, what Claim sends for an IPv4
// address: three broadcast ARP requests from dst's MAC whose sender and
// target protocol addresses are the claimed address and whose target
// hardware address is zero.
func TestGratuitousARPForm(t *testing.T) {
	h := newHosts(t, false)
	svc, dstMAC := h.svc.Addr(), mac(t, h.dst)
	var c *arp.Client
	err := h.peer.Do(func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		p, err := packet.Listen(ifi, packet.Raw, 0x0806, nil)
		if err != nil {
			return err
		}
		c, err = arp.New(ifi, p)
		if err != nil {
			p.Close()
		}
		return err
	})
	if err != nil {
		t.Fatalf("ARP capture on the peer: %v", err)
	}
	defer c.Close()

	if err := addrmove.Claim(context.Background(), h.cfg(h.dst)); err != nil {
		t.Fatal(err)
	}
	if err := c.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
		t.Fatal(err)
	}
	zero := make(net.HardwareAddr, 6)
	seen := 0
	for seen < wantAnnouncements {
		p, eth, err := c.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("the peer saw %d gratuitous ARPs for %s, want %d", seen, svc, wantAnnouncements)
		}
		if err != nil {
			t.Fatal(err)
		}
		if p.SenderIP != svc {
			continue // the lab's other ARP traffic
		}
		seen++
		if p.Operation != arp.OperationRequest || p.TargetIP != svc ||
			!bytes.Equal(p.SenderHardwareAddr, dstMAC) || !bytes.Equal(p.TargetHardwareAddr, zero) ||
			!bytes.Equal(eth.Destination, ethernet.Broadcast) || !bytes.Equal(eth.Source, dstMAC) {
			t.Errorf("announcement %d: %v %s/%s -> %s/%s in a frame %s -> %s; want a broadcast request %s/%s -> %s/%s",
				seen, p.Operation, p.SenderHardwareAddr, p.SenderIP, p.TargetHardwareAddr, p.TargetIP,
				eth.Source, eth.Destination, dstMAC, svc, zero, svc)
		}
	}
}

// TestUnsolicitedNAForm captures, on the peer, what Claim sends for an IPv6
// address: three Neighbor Advertisements to ff02::1 with hop limit 255, from
// the claimed address, Override set, Solicited clear, and dst's MAC in the
// Target Link-Layer Address option.
func TestUnsolicitedNAForm(t *testing.T) {
	h := newHosts(t, true)
	svc, dstMAC := h.svc.Addr(), mac(t, h.dst)
	var c *ndp.Conn
	err := h.peer.Do(func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		c, _, err = ndp.Listen(ifi, ndp.Unspecified)
		if err != nil {
			return err
		}
		if err := c.SetControlMessage(ipv6.FlagDst|ipv6.FlagHopLimit, true); err != nil {
			c.Close()
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatalf("ICMPv6 capture on the peer: %v", err)
	}
	defer c.Close()

	if err := addrmove.Claim(context.Background(), h.cfg(h.dst)); err != nil {
		t.Fatal(err)
	}
	if err := c.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
		t.Fatal(err)
	}
	seen := 0
	for seen < wantAnnouncements {
		m, cm, from, err := c.ReadFrom()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("the peer saw %d neighbor advertisements for %s, want %d", seen, svc, wantAnnouncements)
		}
		if err != nil {
			t.Fatal(err)
		}
		na, ok := m.(*ndp.NeighborAdvertisement)
		if !ok || na.TargetAddress != svc {
			continue // the lab's other ICMPv6 traffic
		}
		seen++
		var tlla net.HardwareAddr
		for _, o := range na.Options {
			if l, ok := o.(*ndp.LinkLayerAddress); ok && l.Direction == ndp.Target {
				tlla = l.Addr
			}
		}
		dst, _ := netip.AddrFromSlice(cm.Dst)
		if !na.Override || na.Solicited || na.Router || !bytes.Equal(tlla, dstMAC) ||
			from.WithZone("") != svc || dst != netip.IPv6LinkLocalAllNodes() || cm.HopLimit != 255 {
			t.Errorf("announcement %d: %+v (target link-layer address %s) from %s to %s, hop limit %d; "+
				"want override, not solicited, not router, %s, from %s to ff02::1, hop limit 255",
				seen, na, tlla, from, dst, cm.HopLimit, dstMAC, svc)
		}
	}
}
