// Package demo is the self-contained demonstration behind `tcpmigrate demo`:
// it builds a lab of network namespaces (a peer, a source host and a target
// host on a bridge), runs a workload whose connections stream checksummed
// data both ways with a peer, migrates every connection from the source to
// the target while the streams run, verifies every byte, and reports.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
	"github.com/tcpmigrate/tcpmigrate/repair"
)

// Options configure a demo run.
type Options struct {
	// Conns is how many connections the workload serves and migrates.
	Conns int
	// Before and After are how long the streams run before and after the move.
	Before, After time.Duration
	// Log receives progress lines; nil discards them.
	Log io.Writer
}

// Report is what a demo run measured.
type Report struct {
	Conns int
	// Freeze is each connection's freeze window: from its source lock to
	// its target unlock.
	Freeze []time.Duration
	// Stall is, for each connection, the longest gap between bytes
	// arriving at the peer over the whole run.
	Stall []time.Duration
	// ToPeer and FromPeer are the bytes verified at each end.
	ToPeer, FromPeer int64
	// StateBytes is the size of the connection state moved (queues included).
	StateBytes int64
	// PeerResets is the change in the peer's TCP reset counters.
	PeerResets int64
}

const svcPort = 8080

// Run builds the lab, migrates the workload's connections and tears the lab
// down again, also on error.
func Run(ctx context.Context, o Options) (*Report, error) {
	if o.Log == nil {
		o.Log = io.Discard
	}
	logf := func(format string, args ...any) { fmt.Fprintf(o.Log, format+"\n", args...) }
	if err := lab.Sweep(); err != nil {
		return nil, err
	}
	lan, err := lab.NewLAN("peer", "src", "dst")
	if err != nil {
		return nil, err
	}
	defer lan.Close()
	peer, src, dst := lan.Host("peer"), lan.Host("src"), lan.Host("dst")
	svc := netip.MustParsePrefix("198.18.0.10/24")
	for ns, p := range map[*lab.NS]string{peer: "198.18.0.1/24", src: "198.18.0.2/24", dst: "198.18.0.3/24"} {
		if err := ns.AddAddr(netip.MustParsePrefix(p)); err != nil {
			return nil, err
		}
	}
	if err := src.AddAddr(svc); err != nil {
		return nil, err
	}
	logf("lab: peer 198.18.0.1, source 198.18.0.2, target 198.18.0.3; service %s on the source", svc.Addr())

	// The workload on the source and its clients on the peer.
	var ln net.Listener
	if err := src.Do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(svc.Addr(), svcPort).String())
		return err
	}); err != nil {
		return nil, err
	}
	defer ln.Close()
	work := make([]*streamcheck.Endpoint, o.Conns)
	clients := make([]*streamcheck.Endpoint, o.Conns)
	conns := make([]*net.TCPConn, o.Conns)
	for i := range o.Conns {
		var c net.Conn
		if err := peer.Do(func() (err error) {
			c, err = net.Dial("tcp", netip.AddrPortFrom(svc.Addr(), svcPort).String())
			return err
		}); err != nil {
			return nil, err
		}
		defer c.Close()
		s, err := ln.Accept()
		if err != nil {
			return nil, err
		}
		conns[i] = s.(*net.TCPConn)
		clients[i], work[i] = streamcheck.NewEndpoint(0, 1), streamcheck.NewEndpoint(1, 0)
		clients[i].Interval, work[i].Interval = time.Millisecond, time.Millisecond
		clients[i].Start(c.(*net.TCPConn))
		work[i].Start(conns[i])
	}
	resetsBefore, err := resets(peer)
	if err != nil {
		return nil, err
	}
	logf("workload: %d connections streaming both ways; running %s before the move", o.Conns, o.Before)
	if err := sleep(ctx, o.Before); err != nil {
		return nil, err
	}

	freeze, state, err := migrate(lan, svc, work, conns, logf)
	if err != nil {
		return nil, err
	}
	logf("moved: the workload carries on on the target; running %s more", o.After)
	if err := sleep(ctx, o.After); err != nil {
		return nil, err
	}

	r := &Report{Conns: o.Conns, StateBytes: state}
	var errs []error
	for i := range o.Conns {
		work[i].Pause()
		clients[i].Pause()
		for _, e := range []*streamcheck.Endpoint{work[i], clients[i]} {
			if err := e.Err(); err != nil {
				errs = append(errs, fmt.Errorf("connection %d: %w", i, err))
			}
		}
		r.Freeze = append(r.Freeze, freeze)
		r.Stall = append(r.Stall, clients[i].MaxGap())
		r.ToPeer += clients[i].Checked()
		r.FromPeer += work[i].Checked()
	}
	// Counted before anything is closed: closing a socket with unread data
	// resets its peer, which is the demo's doing, not the migration's.
	resetsAfter, err := resets(peer)
	if err != nil {
		return nil, err
	}
	r.PeerResets = resetsAfter - resetsBefore
	for _, w := range work {
		w.Conn().Close()
	}
	return r, errors.Join(errs...)
}

// migrate moves every connection of the workload from the source to the
// target: freeze the workload, lock on the source, dump, lock on the target,
// restore, move the address, unlock on the target, resume; then the source
// copies are closed silently.
func migrate(lan *lab.LAN, svc netip.Prefix, work []*streamcheck.Endpoint, conns []*net.TCPConn, logf func(string, ...any)) (time.Duration, int64, error) {
	src, dst, peer := lan.Host("src"), lan.Host("dst"), lan.Host("peer")
	id := strconv.Itoa(os.Getpid())
	srcLock, err := firewall.New(firewall.Config{Instance: "demo-src-" + id, NetNS: src.Handle()})
	if err != nil {
		return 0, 0, err
	}
	defer srcLock.Close()
	dstLock, err := firewall.New(firewall.Config{Instance: "demo-dst-" + id, NetNS: dst.Handle()})
	if err != nil {
		return 0, 0, err
	}
	defer dstLock.Close()

	for _, w := range work {
		w.Pause() // the owner stops touching its sockets
	}
	tuples := make([]firewall.Tuple, len(conns))
	fds := make([]int, len(conns))
	for i, c := range conns {
		tuples[i] = firewall.Tuple{Local: c.LocalAddr().(*net.TCPAddr).AddrPort(), Remote: c.RemoteAddr().(*net.TCPAddr).AddrPort()}
		rc, err := c.SyscallConn()
		if err != nil {
			return 0, 0, err
		}
		rc.Control(func(fd uintptr) { fds[i] = int(fd) })
	}
	snaps := make([]repair.Snapshot, len(conns))
	err = src.Do(func() error {
		for i := range snaps {
			if err := repair.Inspect(fds[i], &snaps[i]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, 0, err
	}
	start := time.Now()
	if err := srcLock.Lock(tuples); err != nil {
		return 0, 0, err
	}
	var state int64
	err = src.Do(func() error {
		for i := range snaps {
			if err := repair.Capture(fds[i], &snaps[i]); err != nil {
				return err
			}
			state += int64(len(snaps[i].RecvQueue) + len(snaps[i].SendQueue))
		}
		return nil
	})
	if err != nil {
		return 0, 0, rollback(srcLock, tuples, fds, snaps, err)
	}
	dumped := time.Since(start)
	if err := dstLock.Lock(tuples); err != nil {
		return 0, 0, rollback(srcLock, tuples, fds, snaps, err)
	}
	restored := make([]int, len(snaps))
	err = dst.Do(func() error {
		for i := range snaps {
			fd, err := repair.Restore(&snaps[i])
			if err != nil {
				return err
			}
			restored[i] = fd
		}
		return nil
	})
	if err != nil {
		for _, fd := range restored {
			if fd > 0 {
				repair.Discard(fd)
			}
		}
		dstLock.Unlock(tuples)
		return 0, 0, rollback(srcLock, tuples, fds, snaps, err)
	}
	// The switch: the service address moves; the peer learns the new link
	// address (on a real network a gratuitous ARP does this).
	if err := src.DelAddr(svc); err != nil {
		return 0, 0, err
	}
	if err := dst.AddAddr(svc); err != nil {
		return 0, 0, err
	}
	if err := peer.FlushNeigh(svc.Addr()); err != nil {
		return 0, 0, err
	}
	if err := dstLock.Unlock(tuples); err != nil {
		return 0, 0, err
	}
	freeze := time.Since(start)
	for i, fd := range restored {
		if err := repair.Resume(fd, &snaps[i]); err != nil {
			return 0, 0, err
		}
		f := os.NewFile(uintptr(fd), "restored")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return 0, 0, err
		}
		work[i].Start(c.(*net.TCPConn))
		conns[i].Close() // in repair mode: the source copy dies silently
	}
	logf("migrated %d connections: dump %s, freeze (source lock to target unlock) %s, %d bytes of queued state",
		len(conns), dumped.Round(time.Microsecond), freeze.Round(time.Microsecond), state)
	return freeze, state, nil
}

// rollback gives the connections back to the source after a failure.
func rollback(lock *firewall.Lock, tuples []firewall.Tuple, fds []int, snaps []repair.Snapshot, cause error) error {
	errs := []error{cause, lock.Unlock(tuples)}
	for i, fd := range fds {
		if snaps[i].State != 0 {
			errs = append(errs, repair.Resume(fd, &snaps[i]))
		}
	}
	return errors.Join(errs...)
}

// resets reads the peer's reset counters (Tcp EstabResets + OutRsts).
func resets(ns *lab.NS) (int64, error) {
	var total int64
	err := ns.Do(func() error {
		b, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		var names []string
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) == 0 || f[0] != "Tcp:" {
				continue
			}
			if names == nil {
				names = f
				continue
			}
			for _, k := range []string{"EstabResets", "OutRsts"} {
				if i := slices.Index(names, k); i > 0 && i < len(f) {
					v, _ := strconv.ParseInt(f[i], 10, 64)
					total += v
				}
			}
		}
		return nil
	})
	return total, err
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
