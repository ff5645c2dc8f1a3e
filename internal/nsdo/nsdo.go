// Package nsdo runs code inside another network namespace: it pins the
// goroutine to its OS thread, switches that thread's namespace, runs the
// function and switches back. Sockets created inside belong to that
// namespace for their whole life, so one agent can restore sockets into a
// namespace (a container's, a test host's) without living in it.
package nsdo

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs fn on an OS thread inside the network namespace whose
// descriptor is fd and returns fn's error. A zero fd runs fn where the
// caller is. Otherwise fn runs on a goroutine of its own, locked to its
// thread, while the caller waits: if that thread cannot return to its
// namespace it is left locked and terminates with the goroutine, so neither
// the caller nor any later goroutine runs in the wrong namespace.
func Do(fd int, fn func() error) error {
	if fd == 0 {
		return fn()
	}
	done := make(chan error, 1)
	go func() { done <- do(fd, fn) }()
	return <-done
}

// do switches the calling goroutine's thread into namespace fd around fn.
func do(fd int, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("nsdo: current namespace: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(netns.NsHandle(fd)); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("nsdo: enter namespace: %w", err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// The thread is stuck in the wrong namespace: leave it locked so
		// that it dies with this goroutine (Do's, not the caller's).
		return errors.Join(ferr, fmt.Errorf("nsdo: leave namespace: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}
