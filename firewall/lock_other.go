//go:build !linux

package firewall

import (
	"net/netip"
	"time"
)

// Lock is the connection lock; it exists only on Linux.
type Lock struct{}

func unsupported(op string) error { return &Error{Op: op, Err: ErrNotSupported} }

// New fails with ErrNotSupported outside Linux.
func New(cfg Config) (*Lock, error) { return nil, unsupported("new") }

// Sweep fails with ErrNotSupported outside Linux.
func Sweep(netns int, keep func(instance string) bool) ([]string, error) {
	return nil, unsupported("sweep")
}

// BypassMark returns 0 outside Linux.
func (l *Lock) BypassMark() uint32 { return 0 }

// Lease returns 0 outside Linux.
func (l *Lock) Lease() time.Duration { return 0 }

// Table returns "" outside Linux.
func (l *Lock) Table() string { return "" }

// CanHold reports false outside Linux.
func (l *Lock) CanHold() bool { return false }

// Hold fails with ErrNotSupported outside Linux.
func (l *Lock) Hold(ts []Tuple) error { return unsupported("hold") }

// Lock fails with ErrNotSupported outside Linux.
func (l *Lock) Lock(ts []Tuple) error { return unsupported("lock") }

// Unlock fails with ErrNotSupported outside Linux.
func (l *Lock) Unlock(ts []Tuple) error { return unsupported("unlock") }

// Release fails with ErrNotSupported outside Linux.
func (l *Lock) Release() error { return unsupported("release") }

// Renew fails with ErrNotSupported outside Linux.
func (l *Lock) Renew(ts []Tuple) error { return unsupported("renew") }

// RenewAll fails with ErrNotSupported outside Linux.
func (l *Lock) RenewAll() error { return unsupported("renew") }

// StartRenewer fails with ErrNotSupported outside Linux.
func (l *Lock) StartRenewer(interval time.Duration, onErr func(error)) error {
	return unsupported("renew")
}

// StopRenewer does nothing outside Linux.
func (l *Lock) StopRenewer() {}

// Close does nothing outside Linux.
func (l *Lock) Close() error { return nil }

// ListenLock is the listener lock; it exists only on Linux.
type ListenLock struct{}

// NewListenLock fails with ErrNotSupported outside Linux.
func NewListenLock(cfg Config) (*ListenLock, error) { return nil, unsupported("new listen lock") }

// Lock fails with ErrNotSupported outside Linux.
func (l *ListenLock) Lock(eps []netip.AddrPort) error { return unsupported("lock listeners") }

// Unlock does nothing outside Linux.
func (l *ListenLock) Unlock(eps []netip.AddrPort) error { return nil }

// Held returns nothing outside Linux.
func (l *ListenLock) Held() []netip.AddrPort { return nil }

// StartRenewer does nothing outside Linux.
func (l *ListenLock) StartRenewer(onErr func(error)) {}

// Table returns "" outside Linux.
func (l *ListenLock) Table() string { return "" }

// StopRenewer does nothing outside Linux.
func (l *ListenLock) StopRenewer() {}

// Close does nothing outside Linux.
func (l *ListenLock) Close() error { return nil }
