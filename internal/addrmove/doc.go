// Package addrmove moves a service address between hosts at the switch phase
// of a migration: the source host releases it, the target host claims it and
// tells the LAN, so that peers send to the target at once instead of waiting
// for their neighbour entries to time out.
//
// The package has three verbs, each acting on one address of one device in
// one network namespace (Config):
//
//	source:  Release            (the address is removed)
//	target:  Claim              (the address is added, then announced)
//	either:  Present            (is the address configured?)
//
// On abort the roles reverse: the target releases and the source claims, so
// the peers learn the source's link-layer address again.
//
// Announcements. After adding an address, Claim sends three announcements a
// few milliseconds apart (the repeats cover a lost frame):
//
//   - IPv4: gratuitous ARP in the request form (RFC 5227's ARP Announcement):
//     an ARP request broadcast to ff:ff:ff:ff:ff:ff whose sender and target
//     protocol addresses are both the claimed address and whose target
//     hardware address is zero. This is the form Linux itself sends on a link
//     change and `arping -U` sends; Linux peers override an existing entry on
//     it at once, whereas a gratuitous reply is taken only when its target
//     hardware address repeats the sender's.
//   - IPv6: an unsolicited Neighbor Advertisement (RFC 4861 section 7.2.6) to
//     the all-nodes address ff02::1, with the Override flag set, the
//     Solicited flag clear, and the Target Link-Layer Address option, sent
//     from the claimed address itself as Linux does.
//
// Peers update an entry they already hold and, by default, create none: an
// announcement makes no new neighbours, it only corrects stale ones. Devices
// without an Ethernet-style hardware address, loopback devices and devices
// with ARP off get the address but no announcement.
//
// Invariants:
//
//   - Claim adds IPv6 addresses with IFA_F_NODAD, so they are usable (bindable
//     and answered for) the moment Claim returns; IPv4 addresses are added
//     plainly. There is deliberately no way to add the address without
//     announcing it: sockets restored before the switch use IP_TRANSPARENT
//     instead of an early address.
//   - Claim and Release are idempotent: claiming a present address only
//     announces it again, releasing an absent one does nothing. A missing
//     device is always an error (ErrNoDevice), never "absent", so that a typo
//     in a device name cannot leave the address live on the source.
//   - Every netlink socket and packet socket is opened inside the namespace
//     that Config names (NetNS). Netlink sockets are closed before the call
//     returns; Claim's ARP or ICMPv6 socket is closed by a timer 2 s after
//     its announcements, because its close waits for an RCU grace period
//     and holds a Go P meanwhile (announce.go: closing it at once stalled
//     the commit that follows a claim). Netlink sockets come from the
//     library's namespace-aware constructor; the ARP and ICMPv6 sockets are
//     opened and used on a fresh OS thread that enters the namespace and
//     exits when done, so the caller's thread never changes namespace.
//   - Errors are *Error values naming the operation, the address and the
//     device, wrapping a sentinel of this package or the kernel's errno.
package addrmove
