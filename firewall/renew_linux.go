package firewall

import (
	"errors"
	"fmt"
	"time"
)

// renewer is the background goroutine of Lock.StartRenewer and
// ListenLock.StartRenewer.
type renewer struct {
	stop chan struct{}
	done chan struct{}
}

// StartRenewer starts a goroutine that calls RenewAll every interval until
// StopRenewer or Close, so that the locks of a live agent never lapse while
// those of a dead one lapse within a lease. interval 0 means a third of the
// lease; otherwise it must be positive and at most half the lease. Every
// error of RenewAll is passed to onErr (if not nil), from the renewer's
// goroutine; an ErrLeaseLapsed there means the renewer fell behind and the
// tuples it names were briefly unlocked.
func (l *Lock) StartRenewer(interval time.Duration, onErr func(error)) error {
	if interval == 0 {
		interval = l.cfg.Lease / 3
	}
	if interval <= 0 || interval > l.cfg.Lease/2 {
		return &Error{Op: "renew", Table: l.table,
			Err: fmt.Errorf("%w: renew interval %v outside (0, %v]", ErrInvalidConfig, interval, l.cfg.Lease/2)}
	}
	l.renewMu.Lock()
	defer l.renewMu.Unlock()
	l.mu.Lock()
	closed := l.closed
	l.mu.Unlock()
	if closed {
		return &Error{Op: "renew", Table: l.table, Err: ErrClosed}
	}
	if l.renewer != nil {
		return &Error{Op: "renew", Table: l.table, Err: ErrRenewerRunning}
	}
	l.renewer = startRenewer(interval, l.RenewAll, onErr)
	return nil
}

// StopRenewer stops the renewer started by StartRenewer and waits for its
// goroutine to end. It does nothing if no renewer runs.
func (l *Lock) StopRenewer() {
	l.renewMu.Lock()
	r := l.renewer
	l.renewer = nil
	l.renewMu.Unlock()
	r.stopAndWait()
}

// startRenewer starts a goroutine that calls renew every interval until
// stopAndWait, or until renew reports ErrClosed. Every error of renew is
// passed to onErr (if not nil), from the renewer's goroutine.
func startRenewer(interval time.Duration, renew func() error, onErr func(error)) *renewer {
	r := &renewer{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-r.stop:
				return
			case <-t.C:
			}
			err := renew()
			if err != nil && onErr != nil {
				onErr(err)
			}
			if errors.Is(err, ErrClosed) {
				return
			}
		}
	}()
	return r
}

// stopAndWait stops the renewer and waits for its goroutine to end. A nil
// renewer is not running: nothing is done.
func (r *renewer) stopAndWait() {
	if r != nil {
		close(r.stop)
		<-r.done
	}
}
