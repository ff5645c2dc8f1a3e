// Package firewall is the connection lock of tcpmigrate: while a connection
// is between hosts, it keeps both kernels from seeing or sending any of its
// packets, so that no stray ACK or RST can kill it.
//
// Each agent instance owns one nftables table (family inet, named
// TablePrefix + instance) in the network namespace it locks in. The table
// holds two sets of 4-tuples, one per address family, keyed
// local·lport·remote·rport with element timeouts, and two base chains, on
// prerouting and output at priority -300 (before conntrack), whose rules
// accept the bypass mark and otherwise drop TCP packets found in the sets,
// counting them. A locked tuple is one element; each chain looks a packet up
// in both orders (saddr·sport·daddr·dport and daddr·dport·saddr·sport), so
// the element matches the connection's packets in both directions, at the
// first hook they cross. The package speaks netlink through google/nftables
// and never runs nft(8) or iptables(8). docs/firewall.md explains the
// choices.
//
// Invariants:
//
//   - Lock, Unlock and Renew each send one netlink batch, whatever the
//     number of tuples; the kernel applies it atomically, so the tuples of a
//     call change state at the same instant, or none does.
//   - Lock and Unlock are idempotent; Close and Sweep are too, and a table
//     already gone is not an error.
//   - Every locked tuple has a lease. A live agent renews it (Renew,
//     RenewAll, StartRenewer); if the agent dies, the kernel drops the
//     elements when the lease runs out, and Sweep removes the empty table.
//   - The package touches nothing outside its own tables: other tables,
//     chains, sets and counters stay byte for byte as they were, and two
//     instances never see each other's locks.
//
// Errors are *Error values naming the operation, the table and, where it
// matters, the tuples at fault, wrapping a sentinel error or the kernel's.
package firewall
