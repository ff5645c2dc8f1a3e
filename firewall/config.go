package firewall

import (
	"fmt"
	"time"
)

// Names and defaults. They appear in rulesets and in other processes'
// sweeps, so they are part of the package's contract.
const (
	// TablePrefix starts the name of every table this package creates; the
	// rest of the name is the instance. Sweep looks only at inet tables with
	// this prefix.
	TablePrefix = "tcpmigrate_"
	// DefaultBypassMark is the packet mark ("tm" in ASCII) that the lock lets
	// through when Config.BypassMark is 0.
	DefaultBypassMark uint32 = 0x746d
	// DefaultLease is the lease of a lock element when Config.Lease is 0.
	DefaultLease = 10 * time.Second
	// MinLease and MaxLease bound Config.Lease.
	MinLease = time.Second
	MaxLease = 24 * time.Hour
	// MaxInstanceLen bounds the length of Config.Instance.
	MaxInstanceLen = 64
	// Priority is the priority of both base chains (prerouting and output):
	// after defragmentation (-400), before conntrack (-200). See
	// docs/firewall.md for why.
	Priority = -300
)

// Object names inside a lock table.
const (
	chainIn  = "in"  // hook prerouting
	chainOut = "out" // hook output
	setV4    = "v4"
	setV6    = "v6"
	holdV4   = "h4" // tuples held with a zero window (Config.Hold)
	holdV6   = "h6"
)

// Config says where a Lock lives and how it behaves.
type Config struct {
	// Instance names the lock; it must be unique among the live agents of
	// a network namespace, 1 to MaxInstanceLen characters from [A-Za-z0-9_.-].
	// The table is named TablePrefix + Instance. Using the migration ID, as
	// both hosts persist it, lets a restarted agent find its table again.
	Instance string
	// NetNS is a file descriptor of the network namespace to lock in; 0
	// means the namespace of the calling thread at the time of New. New
	// duplicates the descriptor, so the caller may close its own.
	NetNS int
	// BypassMark is the packet mark (meta mark, compared exactly, all 32
	// bits) that both chains accept before the lock lookup, so that packets
	// the agent crafts itself (sent with SO_MARK) pass the lock. 0 means
	// DefaultBypassMark.
	BypassMark uint32
	// Lease is how long a locked tuple stays locked without renewal; it
	// bounds how long a crashed agent can freeze connections. 0 means
	// DefaultLease; otherwise it must lie within [MinLease, MaxLease] and is
	// rounded down to a millisecond.
	Lease time.Duration
	// Hold adds the zero-window hold to the table: two more sets (h4, h6)
	// and an output rule that rewrites the TCP window of segments leaving a
	// held tuple to 0 (see Lock.Hold). If the kernel refuses that rule, New
	// builds the table without it and Lock.CanHold reports false.
	Hold bool
}

// withDefaults validates c and fills in the defaults.
func (c Config) withDefaults() (Config, error) {
	if err := checkInstance(c.Instance); err != nil {
		return c, err
	}
	if c.NetNS < 0 {
		return c, fmt.Errorf("%w: negative netns descriptor %d", ErrInvalidConfig, c.NetNS)
	}
	if c.BypassMark == 0 {
		c.BypassMark = DefaultBypassMark
	}
	if c.Lease == 0 {
		c.Lease = DefaultLease
	}
	if c.Lease < MinLease || c.Lease > MaxLease {
		return c, fmt.Errorf("%w: lease %v outside [%v, %v]", ErrInvalidConfig, c.Lease, MinLease, MaxLease)
	}
	c.Lease = c.Lease.Truncate(time.Millisecond)
	return c, nil
}

func checkInstance(s string) error {
	if s == "" || len(s) > MaxInstanceLen {
		return fmt.Errorf("%w: instance name must have 1 to %d characters, has %d", ErrInvalidConfig, MaxInstanceLen, len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '.' || c == '-') {
			return fmt.Errorf("%w: instance name %q has %q; allowed are [A-Za-z0-9_.-]", ErrInvalidConfig, s, c)
		}
	}
	return nil
}

// TableName returns the name of the table of an instance.
func TableName(instance string) string { return TablePrefix + instance }
