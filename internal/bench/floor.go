package bench

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/bare"
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
				bare.Capture(fd, snaps[i].Options.Mask&repair.OptPeekOff != 0, &buf)
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

// The bare sequences (bare.Capture, and bareRestore below) make the same
// system calls as repair.Capture and repair.Restore (a zero Restorer, as calibrate uses it: no Defaults, no
// Blank), in the same order, with the same values and by the same route
// (RawSyscall where repair uses it, Syscall where it does not: connect,
// send, TCP_CONGESTION, SO_BINDTODEVICE and peeks over 64 KiB; see
// repair/sys.go), for an ESTABLISHED IPv4 connection, with no checks, no
// error wrapping and no struct filling: the floor that the real functions
// are compared with. Only the calls that decide whether the sequence can go
// on (bind, connect) are checked, and only the values that decide which
// calls follow (data in flight, queues to peek, timestamps) are read.
// bareLateOptions mirrors repair's writeLateOptions (repair/options.go)
// without Defaults and must follow it. Package bare, which repair's
// benchmarks share, has the capture's sequence, the restore's queue
// sequences, queue writes and check, and the calls both make.

func rawBind(fd int, sa *unix.RawSockaddrInet4) unix.Errno {
	_, _, e := unix.RawSyscall(unix.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(sa)), unix.SizeofSockaddrInet4)
	return e
}

// bareRestore is repair.Restore's sequence for s, up to the socket left in
// repair mode, whose descriptor it returns.
func bareRestore(s *repair.Snapshot) (int, error) {
	local, remote := s.Tuple()
	if s.Family != unix.AF_INET || s.State != repair.StateEstablished {
		return -1, errors.New("bench: the bare restore knows ESTABLISHED IPv4 connections only")
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return -1, err
	}
	o := &s.Options
	bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON)
	if o.Mask&repair.OptBindToDevice != 0 {
		unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, o.BindToDevice)
	}
	if o.Mark != 0 {
		bare.Set(fd, unix.SOL_SOCKET, unix.SO_MARK, int32(o.Mark))
	}
	if o.Mask&repair.OptTransparent != 0 {
		bare.Set(fd, unix.IPPROTO_IP, unix.IP_TRANSPARENT, 1)
	}
	if o.Mask&repair.OptFreebind != 0 {
		bare.Set(fd, unix.IPPROTO_IP, unix.IP_FREEBIND, 1)
	}
	bare.Set(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, math.MaxInt32/2)
	bare.Set(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, math.MaxInt32/2)
	la := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: local.Addr().As4()}
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&la.Port))[:], local.Port())
	if e := rawBind(fd, &la); e == unix.EADDRNOTAVAIL {
		bare.Set(fd, unix.IPPROTO_IP, unix.IP_TRANSPARENT, 1)
		if e := rawBind(fd, &la); e != 0 {
			unix.Close(fd)
			return -1, fmt.Errorf("bench: bare restore: bind: %w", e)
		}
	} else if e != 0 {
		unix.Close(fd)
		return -1, fmt.Errorf("bench: bare restore: bind: %w", e)
	}
	bare.SetQueueSeqs(fd, s.RecvSeq-uint32(len(s.RecvQueue)), s.SendSeq-uint32(len(s.SendQueue)))
	ra := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: remote.Addr().As4()}
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&ra.Port))[:], remote.Port())
	if _, _, e := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&ra)), unix.SizeofSockaddrInet4); e != 0 && e != unix.EINPROGRESS {
		unix.Close(fd)
		return -1, fmt.Errorf("bench: bare restore: connect: %w", e)
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
	bare.SetN(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_OPTIONS, unsafe.Pointer(&opts[0]), uint32(n)*uint32(unsafe.Sizeof(opts[0])))
	if s.Flags&repair.FlagTimestamps != 0 {
		ts := s.Timestamp
		if s.Flags&repair.FlagUsecTS != 0 {
			ts |= 1 // repair does so on 6.7+ only; the cost is the same
		}
		bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP, int32(ts))
	}
	bare.WriteQueues(fd, s.RecvQueue, s.SentUnacked(), s.NeverSent())
	if s.Flags&repair.FlagWindow != 0 {
		w := s.Window
		bare.SetN(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, unsafe.Pointer(&w), uint32(unsafe.Sizeof(w)))
	}
	bareLateOptions(fd, o)
	if s.Shutdown&repair.ShutRead != 0 {
		unix.Shutdown(fd, unix.SHUT_RD)
	}
	bare.Verify(fd)
	return fd, nil
}

// bareLateOptions makes the calls of repair's writeLateOptions with no
// Defaults on an IPv4 socket: the buffers and their locks, then each
// option whose value a new socket might not have (the constant defaults
// skipped, every sysctl-following one written), TCP_CONGESTION through
// the scheduler.
func bareLateOptions(fd int, o *repair.Options) {
	bare.Set(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, o.SndBuf/2)
	bare.Set(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, o.RcvBuf/2)
	if o.Mask&repair.OptBufLock != 0 {
		bare.Set(fd, unix.SOL_SOCKET, unix.SO_BUF_LOCK, int32(o.BufLock))
	}
	if o.TOS != 0 {
		bare.Set(fd, unix.IPPROTO_IP, unix.IP_TOS, int32(o.TOS))
	}
	for _, b := range [...]struct {
		level, name int
		on          bool
	}{
		{unix.SOL_SOCKET, unix.SO_REUSEPORT, o.ReusePort},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, o.KeepAlive},
		{unix.SOL_SOCKET, unix.SO_OOBINLINE, o.OOBInline},
		{unix.SOL_SOCKET, unix.SO_DONTROUTE, o.DontRoute},
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, o.NoDelay},
		{unix.IPPROTO_TCP, unix.TCP_CORK, o.Cork},
	} {
		if b.on {
			bare.Set(fd, b.level, b.name, 1)
		}
	}
	if o.Priority != 0 || o.TOS != 0 {
		bare.Set(fd, unix.SOL_SOCKET, unix.SO_PRIORITY, o.Priority)
	}
	if o.RcvLowat != 1 {
		bare.Set(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, o.RcvLowat)
	}
	bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, o.KeepIdle)
	bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, o.KeepIntvl)
	bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_KEEPCNT, o.KeepCnt)
	bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_LINGER2, o.Linger2)
	bare.Set(fd, unix.IPPROTO_IP, unix.IP_TTL, o.TTL)
	if o.UserTimeout != 0 {
		bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int32(o.UserTimeout))
	}
	if o.NotSentLowat != 0 {
		bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, int32(o.NotSentLowat))
	}
	if o.Mask&repair.OptRTOMin != 0 {
		bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_RTO_MIN_US, int32(o.RTOMinUs))
	}
	if o.Mask&repair.OptRTOMax != 0 {
		bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_RTO_MAX_MS, int32(o.RTOMaxMs))
	}
	if o.Mask&repair.OptTxDelay != 0 {
		bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_TX_DELAY, int32(o.TxDelayUs))
	}
	if o.WindowClamp != 0 {
		bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, int32(o.WindowClamp))
	}
	if o.Mask&repair.OptLinger != 0 {
		l := [2]int32{1, o.LingerSecs}
		bare.SetN(fd, unix.SOL_SOCKET, unix.SO_LINGER, unsafe.Pointer(&l), 8)
	}
	for _, t := range [...]struct {
		name int
		d    time.Duration
	}{{unix.SO_SNDTIMEO, o.SndTimeo}, {unix.SO_RCVTIMEO, o.RcvTimeo}} {
		if t.d != 0 {
			tv := unix.NsecToTimeval(t.d.Nanoseconds())
			bare.SetN(fd, unix.SOL_SOCKET, t.name, unsafe.Pointer(&tv), uint32(unsafe.Sizeof(tv)))
		}
	}
	if o.Mask&repair.OptMaxPacingRate != 0 {
		r := o.MaxPacingRate
		bare.SetN(fd, unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE, unsafe.Pointer(&r), 8)
	}
	if o.Mask&repair.OptCongestion != 0 && o.Congestion != "" {
		unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION, o.Congestion)
	}
	if o.Mask&repair.OptRecvErr != 0 {
		bare.Set(fd, unix.IPPROTO_IP, unix.IP_RECVERR, 1)
	}
	bare.Set(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, o.MTUDiscover)
}
