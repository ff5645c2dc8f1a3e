package bench

import (
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/repair"
)

// costs are the per-connection timings of a calibration, and the timings
// of the lock operations it made.
type costs struct {
	inspect, dump, restore  []time.Duration
	floorDump, floorRestore []time.Duration
	lockTable, lock, unlock []time.Duration
}

// calibrate times, one connection at a time, what a migration spends per
// connection: repair.Inspect and repair.Capture on the source host,
// repair.Restore on the target host, and the bare syscall sequences of the
// last two. The connections are of the same kind as the migrated ones (same
// queues, same hosts) and are locked on both hosts like them, but they stay
// on the source: each is resumed once unlocked, and each restored copy is
// discarded silently (still in repair mode). The local address is absent
// from the target host, as for the real restore before the switch, so both
// restores take the transparent-bind path.
func calibrate(src, dst *lab.NS, fds []int, tuples []firewall.Tuple) (*costs, error) {
	c := &costs{}
	snaps := make([]repair.Snapshot, len(fds))
	captured := make([]bool, len(fds))
	buf := make([]byte, 4<<20)
	var scratch repair.Snapshot
	var locks []*firewall.Lock
	defer func() {
		for _, l := range locks {
			l.Close()
		}
	}()
	for _, ns := range []*lab.NS{src, dst} {
		t := time.Now()
		l, err := firewall.New(firewall.Config{Instance: fmt.Sprintf("bench-calibrate-%d", os.Getpid()), NetNS: ns.Handle()})
		if err != nil {
			return nil, err
		}
		t1 := time.Now()
		locks = append(locks, l)
		if err := l.Lock(tuples); err != nil {
			return nil, err
		}
		c.lockTable, c.lock = append(c.lockTable, t1.Sub(t)), append(c.lock, time.Since(t1))
	}
	// Each connection is timed for one of the pair (the real call or the
	// bare sequence), alternately, and always first: the first to touch a
	// connection's queues pays for bringing them into the CPU's caches, and
	// a second call on the same data would look cheaper than it is.
	err := src.Do(func() error {
		for i, fd := range fds {
			t := time.Now()
			if err := repair.Inspect(fd, &snaps[i]); err != nil {
				return err
			}
			c.inspect = append(c.inspect, time.Since(t))
			if i%2 == 1 {
				t := time.Now()
				bareCapture(fd, buf)
				c.floorDump = append(c.floorDump, time.Since(t))
			}
			// Like the source agent, Capture reuses one snapshot's queue
			// buffers from connection to connection; the copy kept for the
			// restore is made outside the timing.
			scratch.RecvQueue, scratch.SendQueue = scratch.RecvQueue[:0], scratch.SendQueue[:0]
			recvq, sendq := scratch.RecvQueue, scratch.SendQueue
			scratch = snaps[i]
			scratch.RecvQueue, scratch.SendQueue = recvq, sendq
			t = time.Now()
			if err := repair.Capture(fd, &scratch); err != nil {
				return err
			}
			if i%2 == 0 {
				c.dump = append(c.dump, time.Since(t))
			}
			captured[i] = true
			snaps[i] = scratch
			snaps[i].RecvQueue, snaps[i].SendQueue = slices.Clone(scratch.RecvQueue), slices.Clone(scratch.SendQueue)
		}
		return nil
	})
	if err == nil {
		err = dst.Do(func() error {
			for i := range fds {
				restore, times := repair.Restore, &c.restore
				if i%2 == 1 {
					restore, times = bareRestore, &c.floorRestore
				}
				t := time.Now()
				rfd, err := restore(&snaps[i])
				*times = append(*times, time.Since(t))
				if err != nil {
					return err
				}
				if err := repair.Discard(rfd); err != nil {
					return err
				}
			}
			return nil
		})
	}
	rerr := src.Do(func() error {
		t := time.Now()
		errs := []error{locks[0].Unlock(tuples)}
		c.unlock = append(c.unlock, time.Since(t))
		for i, fd := range fds {
			if captured[i] {
				errs = append(errs, repair.Resume(fd, &snaps[i]))
			}
		}
		return errors.Join(errs...)
	})
	if err = errors.Join(err, rerr); err != nil {
		return nil, fmt.Errorf("bench: calibration: %w", err)
	}
	return c, nil
}

// The bare sequences below make the same system calls as repair.Capture and
// repair.Restore, in the same order, for an established IPv4 connection
// with timestamps (as repair/bench_test.go does for its own benchmark),
// with no checks, no error wrapping and no struct filling: the floor that
// the real functions are compared with. Only the calls that decide whether
// the sequence can go on (bind, connect) are checked. The number of option
// calls mirrors repair's option tables (repair/options.go) as of this
// writing: 12 late setsockopt calls on IPv4 with a kernel that has
// TCP_RTO_MIN_US and TCP_RTO_MAX_MS, for a connection whose options are the
// defaults (repair skips the 11 options whose default is a constant).

const (
	tcpRecvQueue     = 1   // TCP_RECV_QUEUE
	tcpSendQueue     = 2   // TCP_SEND_QUEUE
	tcpNoQueue       = 0   // TCP_NO_QUEUE
	tcpInfoPrefix    = 8   // the bytes of struct tcp_info that repair's state reads decode
	tcpInfoHead      = 152 // the bytes of struct tcp_info that repair.Capture reads
	repairWindowSize = 20  // sizeof(struct tcp_repair_window)
	lateOptionCalls  = 12
)

func rawGet(fd, level, opt int, p unsafe.Pointer, n uint32) {
	l := n
	unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
}

func rawSet(fd, level, opt int, v int32) {
	unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0)
}

func rawIoctl(fd int, req uint) int32 {
	var v int32
	unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&v)))
	return v
}

func rawSend(fd int, b []byte) {
	if len(b) > 0 {
		unix.Syscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT, 0, 0)
	}
}

// bareCapture is repair.Capture's sequence on a socket: repair on,
// TCP_INFO, the queue lengths TCP_INFO does not give, MSS, timestamp,
// window, both queues (the send queue peeked only when it holds
// something), then TCP_INFO again, and SIOCINQ again when the receive
// queue held data.
func bareCapture(fd int, buf []byte) {
	var scratch [64]byte
	var first, last unix.TCPInfo
	p := unsafe.Pointer(&scratch[0])
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&first), tcpInfoHead)
	outq := first.Notsent_bytes
	if first.Unacked != 0 {
		outq = uint32(rawIoctl(fd, unix.SIOCOUTQ))
	}
	inq := rawIoctl(fd, unix.SIOCINQ)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_MAXSEG, p, 4)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP, p, 4)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, p, repairWindowSize)
	for _, q := range []int32{tcpRecvQueue, tcpSendQueue} {
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, q)
		rawGet(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, p, 4)
		if q == tcpRecvQueue || outq > 0 {
			unix.Syscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
		}
	}
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&last), tcpInfoHead)
	if inq > 0 {
		rawIoctl(fd, unix.SIOCINQ)
	}
}

// bareRestore is repair.Restore's sequence for s, up to the socket left in
// repair mode, whose descriptor it returns.
func bareRestore(s *repair.Snapshot) (int, error) {
	local, remote := s.Tuple()
	if !local.Addr().Is4() || !remote.Addr().Is4() {
		return -1, errors.New("bench: the bare restore knows IPv4 only")
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return -1, err
	}
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON)
	if s.Options.Mark != 0 {
		rawSet(fd, unix.SOL_SOCKET, unix.SO_MARK, int32(s.Options.Mark))
	}
	rawSet(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, math.MaxInt32/2)
	rawSet(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, math.MaxInt32/2)
	la := &unix.SockaddrInet4{Port: int(local.Port()), Addr: local.Addr().As4()}
	if err := unix.Bind(fd, la); errors.Is(err, unix.EADDRNOTAVAIL) {
		rawSet(fd, unix.IPPROTO_IP, unix.IP_TRANSPARENT, 1)
		err = unix.Bind(fd, la)
		if err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("bench: bare restore: bind: %w", err)
		}
	} else if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bench: bare restore: bind: %w", err)
	}
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue)
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, int32(s.RecvSeq-uint32(len(s.RecvQueue))))
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpSendQueue)
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, int32(s.SendSeq-uint32(len(s.SendQueue))))
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(remote.Port()), Addr: remote.Addr().As4()}); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		return -1, fmt.Errorf("bench: bare restore: connect: %w", err)
	}
	var opts [4]unix.TCPRepairOpt
	n := 0
	if s.Flags&repair.FlagSACK != 0 {
		opts[n] = unix.TCPRepairOpt{Code: unix.TCPOPT_SACK_PERMITTED}
		n++
	}
	if s.Flags&repair.FlagWScale != 0 {
		opts[n] = unix.TCPRepairOpt{Code: unix.TCPOPT_WINDOW, Val: uint32(s.SndWScale) | uint32(s.RcvWScale)<<16}
		n++
	}
	if s.Flags&repair.FlagTimestamps != 0 {
		opts[n] = unix.TCPRepairOpt{Code: unix.TCPOPT_TIMESTAMP}
		n++
	}
	opts[n] = unix.TCPRepairOpt{Code: unix.TCPOPT_MAXSEG, Val: s.MSSClamp}
	n++
	unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_REPAIR_OPTIONS,
		uintptr(unsafe.Pointer(&opts[0])), uintptr(n)*unsafe.Sizeof(opts[0]), 0)
	if s.Flags&repair.FlagTimestamps != 0 {
		ts := s.Timestamp
		if s.Flags&repair.FlagUsecTS != 0 {
			ts |= 1
		}
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP, int32(ts))
	}
	if len(s.RecvQueue) > 0 {
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue)
		rawSend(fd, s.RecvQueue)
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpSendQueue)
	}
	rawSend(fd, s.SentUnacked())
	if s.Unsent > 0 {
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP)
		rawSend(fd, s.NeverSent())
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON)
	}
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue)
	w := s.Window
	unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW,
		uintptr(unsafe.Pointer(&w)), repairWindowSize, 0)
	for range lateOptionCalls {
		rawSet(fd, unix.SOL_SOCKET, unix.SO_PRIORITY, 0)
	}
	rawIoctl(fd, unix.SIOCOUTQ)
	rawIoctl(fd, unix.SIOCOUTQNSD)
	rawIoctl(fd, unix.SIOCINQ)
	var info [tcpInfoPrefix]byte
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&info[0]), tcpInfoPrefix)
	return fd, nil
}
