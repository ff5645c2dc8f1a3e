package addrmove

import (
	"errors"
	"net/netip"
	"strings"
)

// Sentinel errors. They reach callers wrapped in an *Error; test for them
// with errors.Is.
var (
	// ErrInvalidConfig means the Config names no usable address or device:
	// an invalid or IPv4-mapped prefix, an unspecified or multicast address,
	// an empty device name or a negative namespace descriptor.
	ErrInvalidConfig = errors.New("addrmove: invalid config")
	// ErrNoDevice means the device does not exist in the namespace.
	ErrNoDevice = errors.New("addrmove: no such device")
	// ErrPrefixMismatch means Claim found the address already configured on
	// the device with another prefix length; it changes nothing then.
	ErrPrefixMismatch = errors.New("addrmove: address configured with another prefix length")
)

// Op names the operation an *Error comes from.
type Op string

// The operations of the package.
const (
	OpClaim   Op = "claim"
	OpRelease Op = "release"
	OpPresent Op = "present"
)

// Error is a failed Claim, Release or Present. Its message reads
// "addrmove: OP PREFIX on DEV: cause".
type Error struct {
	// Op is the operation that failed.
	Op Op
	// Prefix is the address (with its prefix length) it acted on.
	Prefix netip.Prefix
	// Dev is the device it acted on.
	Dev string
	// Err is the cause: a sentinel of this package, the kernel's errno, a
	// context error, or an error of the ARP or NDP library, usually wrapped
	// with the step that failed.
	Err error
}

func (e *Error) Error() string {
	cause := "<nil>"
	if e.Err != nil {
		cause = strings.TrimPrefix(e.Err.Error(), "addrmove: ")
	}
	return "addrmove: " + string(e.Op) + " " + e.Prefix.String() + " on " + e.Dev + ": " + cause
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

func opError(op Op, cfg Config, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, Prefix: cfg.Prefix, Dev: cfg.Dev, Err: err}
}
