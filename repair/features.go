package repair

import "strings"

// Features is a set of kernel capabilities that migration depends on, as
// Probe finds them. Both agents exchange theirs before anything is frozen.
type Features uint32

// The kernel features Probe looks for.
const (
	// FeatRepair: TCP_REPAIR can be turned on (CAP_NET_ADMIN is held).
	FeatRepair Features = 1 << iota
	// FeatRepairWindow: TCP_REPAIR_WINDOW exists (Linux 4.8+). Required.
	FeatRepairWindow
	// FeatHalfClosed: half-closed sockets can enter repair (Linux 4.10+).
	FeatHalfClosed
	// FeatTimestamp: TCP_TIMESTAMP can be read under repair.
	FeatTimestamp
	// FeatUsecTS: the kernel multiplexes the microsecond-timestamp flag into
	// bit 0 of TCP_TIMESTAMP (Linux 6.7+).
	FeatUsecTS
	// FeatRepairOffNoWP: repair can be left without a window probe (4.18+).
	FeatRepairOffNoWP
	// FeatBufLock: SO_BUF_LOCK exists (5.14+).
	FeatBufLock
	// FeatRawInject: a header-including raw socket can be opened
	// (CAP_NET_RAW), needed to craft segments for half-closed states.
	FeatRawInject
	// FeatMark: SO_MARK can be set (CAP_NET_ADMIN), needed to pass the lock.
	FeatMark
	// FeatHeldRestore: this side can take over connections whose peer was
	// held with a zero window (FlagHeld): it has FeatRepairOffNoWP,
	// FeatRawInject and FeatMark, and software that uses them for
	// ResumeHeld and Kick. A target advertises it so that the source may
	// hold (REPAIR-NOTES 10.4).
	FeatHeldRestore
)

var featureNames = []string{
	"repair", "repair-window", "half-closed", "timestamp", "usec-ts",
	"repair-off-no-wp", "buf-lock", "raw-inject", "mark", "held-restore",
}

// String lists the features by name, separated by commas.
func (f Features) String() string {
	var names []string
	for i, n := range featureNames {
		if f&(1<<i) != 0 {
			names = append(names, n)
		}
	}
	return strings.Join(names, ",")
}

// Has reports whether every feature in want is in f.
func (f Features) Has(want Features) bool { return f&want == want }

// Capabilities is what Probe reports about the running kernel.
type Capabilities struct {
	// Features are the repair-related features found.
	Features Features
	// Kernel is the kernel release (uname -r).
	Kernel string
	// Congestion lists the available congestion-control algorithms.
	Congestion []string
}
