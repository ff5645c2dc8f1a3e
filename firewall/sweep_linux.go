package firewall

import (
	"errors"
	"slices"
	"strings"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// Sweep removes the lock tables of dead instances from the network
// namespace netns (a descriptor; 0 means the calling thread's namespace)
// and returns their instance names, sorted.
//
// An instance is dead when no process holds it: New binds an abstract unix
// socket named after the table in the lock's namespace and keeps it until
// Close; the kernel releases it when the process exits, even by SIGKILL.
// This works across PID namespaces and cannot be fooled by a reused PID.
// While Sweep removes a table it holds that name itself, so no New for the
// same instance can race with the removal.
//
// keep, if not nil, is asked about each dead instance and can spare it (for
// example a migration whose outcome is still in doubt). A lapsed lease
// already lets traffic through; the sweep only removes what is left.
//
// Only inet tables whose name is TablePrefix followed by a valid instance
// name are considered; nothing else in the ruleset is read or changed. A
// failure on one table does not stop the others; the errors are joined.
func Sweep(netns int, keep func(instance string) bool) ([]string, error) {
	nsfd, err := dupNetNS(netns)
	if err != nil {
		return nil, &Error{Op: "sweep", Err: err}
	}
	defer unix.Close(nsfd)
	c, err := nftables.New(nftables.WithNetNSFd(nsfd))
	if err != nil {
		return nil, &Error{Op: "sweep", Err: err}
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, &Error{Op: "sweep", Err: err}
	}
	var candidates []string
	for _, t := range tables {
		inst, ok := strings.CutPrefix(t.Name, TablePrefix)
		if !ok || checkInstance(inst) != nil {
			continue
		}
		if keep != nil && keep(inst) {
			continue
		}
		candidates = append(candidates, t.Name)
	}
	if len(candidates) == 0 {
		return nil, nil
	}

	// Claim the owner names of all candidates in one trip into the namespace.
	owners := make(map[string]int, len(candidates))
	var errs []error
	err = inNetNS(nsfd, func() error {
		for _, name := range candidates {
			fd, err := claimOwner(name)
			switch {
			case errors.Is(err, ErrExists):
				// Alive: leave it alone.
			case err != nil:
				errs = append(errs, &Error{Op: "sweep", Table: name, Err: err})
			default:
				owners[name] = fd
			}
		}
		return nil
	})
	if err != nil {
		return nil, &Error{Op: "sweep", Err: err}
	}
	defer func() {
		for _, fd := range owners {
			unix.Close(fd)
		}
	}()

	var removed []string
	for _, name := range candidates {
		if _, ok := owners[name]; !ok {
			continue
		}
		c.DelTable(&nftables.Table{Name: name, Family: nftables.TableFamilyINet})
		switch err := c.Flush(); {
		case errors.Is(err, unix.ENOENT):
			continue // another sweeper was faster
		case err != nil:
			errs = append(errs, &Error{Op: "sweep", Table: name, Err: err})
			continue
		}
		removed = append(removed, strings.TrimPrefix(name, TablePrefix))
	}
	slices.Sort(removed)
	return removed, errors.Join(errs...)
}
