// Package lab builds test hosts out of network namespaces: named namespaces,
// veth links and a bridge that joins them, in 198.18.0.0/15 and fd00::/8.
// Tests, benchmarks and the demo use it; it never touches the root
// namespace's addresses, routes or firewall.
//
// Topology changes go through iproute2's ip(8), which every Debian machine
// has; code runs inside a namespace with NS.Do, which pins the goroutine to
// an OS thread and switches that thread's namespace. A socket keeps the
// namespace it was created in, so one process can hold sockets in several
// hosts at once.
package lab

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/vishvananda/netns"

	"github.com/tcpmigrate/tcpmigrate/internal/nsdo"
)

// Prefix starts the name of every namespace the lab creates; the rest is the
// creating process's PID, a counter and the caller's label.
const Prefix = "tmlab"

var counter atomic.Uint32

// NS is a named network namespace owned by the lab.
type NS struct {
	// Name is the namespace's name under /run/netns.
	Name string
	// Label is the short name the caller gave it, such as "peer".
	Label  string
	handle netns.NsHandle
}

// NewNS creates a fresh named network namespace with its loopback up and
// IPv6 duplicate address detection off (so addresses are usable at once).
func NewNS(label string) (*NS, error) {
	name := fmt.Sprintf("%s%d-%d-%s", Prefix, os.Getpid(), counter.Add(1), label)
	if err := ip("netns", "add", name); err != nil {
		return nil, err
	}
	h, err := netns.GetFromName(name)
	if err != nil {
		_ = ip("netns", "del", name)
		return nil, fmt.Errorf("lab: open namespace %s: %w", name, err)
	}
	n := &NS{Name: name, Label: label, handle: h}
	err = n.Do(func() error {
		for _, kv := range [][2]string{
			{"net/ipv6/conf/all/accept_dad", "0"},
			{"net/ipv6/conf/default/accept_dad", "0"},
			{"net/ipv6/conf/default/dad_transmits", "0"},
			{"net/ipv4/ip_forward", "1"},
		} {
			if err := os.WriteFile("/proc/sys/"+kv[0], []byte(kv[1]), 0); err != nil {
				return fmt.Errorf("lab: sysctl %s in %s: %w", kv[0], name, err)
			}
		}
		return nil
	})
	if err == nil {
		err = n.IP("link", "set", "lo", "up")
	}
	if err != nil {
		n.Close()
		return nil, err
	}
	return n, nil
}

// Close deletes the namespace and every interface inside it. It is safe to
// call more than once.
func (n *NS) Close() error {
	if n == nil || n.handle == -1 {
		return nil
	}
	n.handle.Close()
	n.handle = -1
	return ip("netns", "del", n.Name)
}

// Do runs fn with the calling goroutine's OS thread inside the namespace.
// Sockets fn creates belong to the namespace for their whole life.
func (n *NS) Do(fn func() error) error { return nsdo.Do(int(n.handle), fn) }

// Handle returns the namespace's file descriptor handle, for APIs (such as
// netlink connections) that take one. It stays owned by n.
func (n *NS) Handle() int { return int(n.handle) }

// IP runs "ip -n NAME args..." and returns its error output on failure.
func (n *NS) IP(args ...string) error {
	return ip(append([]string{"-n", n.Name}, args...)...)
}

// Exec runs a command inside the namespace (ip netns exec) and returns its
// combined output.
func (n *NS) Exec(name string, args ...string) ([]byte, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("lab: %s %s in %s: %w: %s", name, strings.Join(args, " "), n.Label, err, bytes.TrimSpace(out))
	}
	return out, nil
}

// Command returns a command that will run inside the namespace.
func (n *NS) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Veth joins two namespaces with a veth pair named aIf in a and bIf in b,
// both up. The pair is created directly inside the namespaces.
func Veth(a *NS, aIf string, b *NS, bIf string) error {
	if err := ip("link", "add", aIf, "netns", a.Name, "type", "veth", "peer", "name", bIf, "netns", b.Name); err != nil {
		return err
	}
	if err := a.IP("link", "set", aIf, "up"); err != nil {
		return err
	}
	return b.IP("link", "set", bIf, "up")
}

// Sweep deletes lab namespaces left behind by processes that no longer
// exist (a test killed mid-run). Namespaces of live processes are kept.
func Sweep() error {
	entries, err := os.ReadDir("/run/netns")
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("lab: sweep: %w", err)
	}
	var errs []error
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), Prefix)
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || processAlive(pid) {
			continue
		}
		errs = append(errs, ip("netns", "del", e.Name()))
	}
	return errors.Join(errs...)
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("lab: ip %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}
