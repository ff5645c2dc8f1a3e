package repair

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
	"github.com/tcpmigrate/tcpmigrate/internal/bare"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// benchConn builds a loopback connection in a fresh namespace. With queued
// true, 64 KiB wait unread in the client's receive queue and about 64 KiB
// in its send queue (the server neither reads nor opens its window).
func benchConn(b *testing.B, queued bool) (*lab.NS, int) {
	b.Helper()
	lab.Require(b)
	ns, err := lab.NewNS("bench")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ns.Close() })
	var cl, sv int
	err = ns.Do(func() error {
		ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(ln)
		unix.SetsockoptInt(ln, unix.SOL_SOCKET, unix.SO_RCVBUF, 4096)
		if err := unix.Bind(ln, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			return err
		}
		unix.Listen(ln, 1)
		sa, _ := unix.Getsockname(ln)
		cl, _ = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err := unix.Connect(cl, sa); err != nil {
			return err
		}
		sv, _, err = unix.Accept4(ln, unix.SOCK_CLOEXEC)
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { unix.Close(cl); unix.Close(sv) })
	if queued {
		buf := make([]byte, 64<<10)
		if n, err := unix.Write(sv, buf); err != nil || n != len(buf) {
			b.Fatalf("server write: %d %v", n, err)
		}
		unix.SetNonblock(cl, true)
		for {
			outq, _ := unix.IoctlGetInt(cl, unix.SIOCOUTQ)
			if outq >= 64<<10 {
				break
			}
			if _, err := unix.Write(cl, buf[:min(4096, 64<<10-outq)]); err != nil {
				break
			}
		}
		waitInq(b, cl, 64<<10)
	}
	return ns, cl
}

func waitInq(b *testing.B, fd, n int) {
	for i := 0; i < 100000; i++ {
		if q, _ := unix.IoctlGetInt(fd, unix.SIOCINQ); q >= n {
			return
		}
	}
	b.Fatal("receive queue never filled")
}

// BenchmarkDump measures Dump (Inspect then Capture) of one connection,
// each split out, and the bare syscall sequence of a dump with no Go-side
// work, in the same run.
func BenchmarkDump(b *testing.B) {
	for _, q := range []struct {
		name   string
		queued bool
	}{{"idle", false}, {"64KiB", true}} {
		b.Run(q.name+"/Dump", func(b *testing.B) {
			ns, fd := benchConn(b, q.queued)
			var s Snapshot
			err := ns.Do(func() error {
				b.ReportAllocs()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if err := Dump(fd, &s); err != nil {
						return err
					}
					b.StopTimer()
					setInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP)
					b.StartTimer()
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(len(s.RecvQueue)+len(s.SendQueue)), "queued-bytes")
		})
		b.Run(q.name+"/Inspect", func(b *testing.B) {
			ns, fd := benchConn(b, q.queued)
			var s Snapshot
			err := ns.Do(func() error {
				b.ReportAllocs()
				for i := 0; i < b.N; i++ {
					if err := Inspect(fd, &s); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
		b.Run(q.name+"/Capture", func(b *testing.B) {
			ns, fd := benchConn(b, q.queued)
			var s Snapshot
			if err := ns.Do(func() error { return Inspect(fd, &s) }); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := Capture(fd, &s); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(q.name+"/bare-syscalls", func(b *testing.B) {
			ns, fd := benchConn(b, q.queued)
			buf := make([]byte, 256<<10)
			var s Snapshot
			if err := ns.Do(func() error { return Inspect(fd, &s) }); err != nil {
				b.Fatal(err)
			}
			ns.Do(func() error {
				b.ReportAllocs()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					bareInspect(fd)
					bare.Capture(fd, s.Options.Mask&OptPeekOff != 0, &buf)
					b.StopTimer()
					setInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP)
					b.StartTimer()
				}
				return nil
			})
		})
	}
}

// benchDumpTarget dumps the connection fd of ns and opens the namespace to
// restore it in, with its loopback up.
func benchDumpTarget(b *testing.B, ns *lab.NS, fd int) (Snapshot, *lab.NS) {
	b.Helper()
	var s Snapshot
	if err := ns.Do(func() error { return Dump(fd, &s) }); err != nil {
		b.Fatal(err)
	}
	dst, err := lab.NewNS("bench-dst")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dst.Close() })
	dst.IP("link", "set", "lo", "up")
	return s, dst
}

// BenchmarkRestore measures Restore of a dumped connection into a second
// namespace, followed by the silent close of the result, beside the bare
// syscall sequence of the same restore and close.
func BenchmarkRestore(b *testing.B) {
	for _, q := range []struct {
		name   string
		queued bool
	}{{"idle", false}, {"64KiB", true}} {
		ns, fd := benchConn(b, q.queued)
		s, dst := benchDumpTarget(b, ns, fd)
		b.Run(q.name+"/Restore+Discard", func(b *testing.B) { benchRestore(b, dst, &Restorer{}, &s, onNewSocket) })
		// The part of a restore inside the freeze when the socket was made
		// before it (NewBlank, untimed) and the namespace's defaults are
		// known: what the target does per connection after the lock.
		var d *Defaults
		if err := dst.Do(func() (err error) { d, err = ReadDefaults(); return err }); err != nil {
			b.Fatal(err)
		}
		rd := &Restorer{Defaults: d}
		b.Run(q.name+"/RestoreBlank+Discard", func(b *testing.B) { benchRestore(b, dst, rd, &s, onBlank) })
		// A Go program's connection (TCP_NODELAY, keepalive every 15 s),
		// on a Blank made bare and on one preset with its options before
		// the freeze (Restorer.Preset, untimed).
		gs := s
		gs.Options.NoDelay, gs.Options.KeepAlive, gs.Options.KeepIdle, gs.Options.KeepIntvl = true, true, 15, 15
		b.Run(q.name+"/go-options/RestoreBlank+Discard", func(b *testing.B) { benchRestore(b, dst, rd, &gs, onBlank) })
		b.Run(q.name+"/go-options/RestoreBlank-preset+Discard", func(b *testing.B) { benchRestore(b, dst, rd, &gs, onPresetBlank) })
		b.Run(q.name+"/bare-syscalls", func(b *testing.B) {
			err := dst.Do(func() error {
				b.ReportAllocs()
				for i := 0; i < b.N; i++ {
					if err := bareRestore(&s); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}

// restoreOn is what benchRestore restores on.
type restoreOn int

const (
	onNewSocket   restoreOn = iota // Restore
	onBlank                        // RestoreBlank, on a Blank made outside the timer
	onPresetBlank                  // RestoreBlank, on a Blank also preset with the snapshot's options outside the timer
)

// benchRestore times, in dst, r's restore of s on what on says and the
// silent close of the result (still in repair mode).
func benchRestore(b *testing.B, dst *lab.NS, r *Restorer, s *Snapshot, on restoreOn) {
	// Errors are returned, not b.Fatal'd: Fatal inside Do would end the
	// goroutine Do waits for, and the run would hang.
	err := dst.Do(func() error {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			var blank *Blank // nil: a new socket, exactly as Restore
			if on != onNewSocket {
				b.StopTimer()
				var err error
				if blank, err = NewBlank(s.Local); err != nil {
					return err
				}
				if on == onPresetBlank {
					if err := r.Preset(blank, &s.Options); err != nil {
						return err
					}
				}
				b.StartTimer()
			}
			rfd, err := r.RestoreBlank(blank, s)
			if err != nil {
				return err
			}
			unix.Close(rfd)
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}

// The bare sequences (bareInspect and bareRestore below, bare.Capture)
// make the same system calls as Inspect, Capture and Restore (a zero
// Restorer, as BenchmarkRestore's Restore+Discard), in the same order,
// with the same values and by the same route (RawSyscall where repair uses
// it, Syscall where it does not: sys.go), with no checks, no error
// wrapping and no struct filling: the floor that the real functions are
// compared with. They read only the values that decide which calls the
// real functions make (data in flight, a queue to peek, timestamps), and
// know an ESTABLISHED connection, the one benchConn makes. Where repair's
// own helper does nothing but make the calls (the option writers,
// inflateBuffers, bindLocal, setQueueSeq, setRepairOptions,
// writeTimestamp, setWindow), bareRestore calls it, so that the two
// sequences cannot drift apart; what it leaves out is Validate, the Blank,
// the OpError wrapping and verifyRestored's comparisons.

var scratch [8192]byte

// TestBareCopies pins the values package bare copies from this package.
func TestBareCopies(t *testing.T) {
	if bare.MaxRawPeek != maxRawPeek {
		t.Errorf("bare.MaxRawPeek = %d, maxRawPeek = %d", bare.MaxRawPeek, maxRawPeek)
	}
	if bare.InfoLen != tcpInfoSize {
		t.Errorf("bare.InfoLen = %d, tcpInfoSize = %d", bare.InfoLen, tcpInfoSize)
	}
}

// plainGet and plainIoctl are the bare forms of getsockopt and ioctlInt;
// package bare has those of the raw helpers, Capture's sequence, and
// Restore's queue writes (bare.WriteQueues) and check (bare.Verify).
func plainGet(fd, level, opt int, n uint32) {
	l := n
	unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&scratch[0])), uintptr(unsafe.Pointer(&l)), 0)
}

func plainIoctl(fd int, req uint) int32 {
	var v int32
	unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&v)))
	return v
}

// inspectOpts are the getsockopt calls of readOptions for IPv4, in order,
// with their lengths.
var inspectOpts = func() (c []struct {
	level, name int
	n           uint32
}) {
	add := func(level, name int, n uint32) {
		c = append(c, struct {
			level, name int
			n           uint32
		}{level, name, n})
	}
	add(unix.SOL_SOCKET, unix.SO_SNDBUF, 4)
	add(unix.SOL_SOCKET, unix.SO_RCVBUF, 4)
	add(unix.SOL_SOCKET, unix.SO_BUF_LOCK, 4)
	add(unix.SOL_SOCKET, unix.SO_REUSEADDR, 4)
	for _, o := range boolOpts {
		add(o.level, o.name, 4)
	}
	for _, o := range intOpts {
		add(o.level, o.name, 4)
	}
	for _, o := range uintOpts {
		add(o.level, o.name, 4)
	}
	for _, o := range optionalOpts {
		add(o.level, o.name, 4)
	}
	add(unix.IPPROTO_TCP, unix.TCP_TX_DELAY, 4)
	add(unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, 4)
	add(unix.SOL_SOCKET, unix.SO_LINGER, 8)
	add(unix.SOL_SOCKET, unix.SO_SNDTIMEO, 16)
	add(unix.SOL_SOCKET, unix.SO_RCVTIMEO, 16)
	add(unix.SOL_SOCKET, unix.SO_PEEK_OFF, 4)
	add(unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE, 8)
	add(unix.SOL_SOCKET, unix.SO_BINDTODEVICE, 16)
	add(unix.IPPROTO_TCP, unix.TCP_CONGESTION, 16)
	add(unix.IPPROTO_IP, unix.IP_TOS, 4)
	add(unix.IPPROTO_IP, unix.IP_RECVERR, 4)
	add(unix.IPPROTO_IP, unix.IP_TRANSPARENT, 4)
	add(unix.IPPROTO_IP, unix.IP_FREEBIND, 4)
	add(unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, 4)
	return c
}()

func bareInspect(fd int) {
	plainGet(fd, unix.SOL_SOCKET, unix.SO_DOMAIN, 4)
	plainGet(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL, 4)
	plainGet(fd, unix.IPPROTO_TCP, unix.TCP_INFO, tcpInfoSize)
	l := uint32(128)
	unix.Syscall(unix.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&scratch[0])), uintptr(unsafe.Pointer(&l)))
	unix.Syscall(unix.SYS_GETPEERNAME, uintptr(fd), uintptr(unsafe.Pointer(&scratch[0])), uintptr(unsafe.Pointer(&l)))
	plainGet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 4)
	plainGet(fd, unix.IPPROTO_TCP, unix.TCP_ULP, 16)
	plainGet(fd, unix.IPPROTO_TCP, tcpAOInfo, 64)
	plainIoctl(fd, unix.SIOCATMARK)
	plainGet(fd, unix.SOL_SOCKET, unix.SO_COOKIE, 8)
	plainGet(fd, unix.SOL_SOCKET, unix.SO_BINDTOIFINDEX, 4)
	// The sock_diag lookup: socket, request, answer, close.
	s, _ := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	var req [unix.NLMSG_HDRLEN + inetDiagReqLen]byte
	req[0], req[4], req[6], req[16], req[17], req[18] = byte(len(req)), unix.SOCK_DIAG_BY_FAMILY, unix.NLM_F_REQUEST, unix.AF_INET, unix.IPPROTO_TCP, 2
	var sa unix.RawSockaddrNetlink
	sa.Family = unix.AF_NETLINK
	unix.Syscall6(unix.SYS_SENDTO, uintptr(s), uintptr(unsafe.Pointer(&req[0])), uintptr(len(req)), 0, uintptr(unsafe.Pointer(&sa)), unix.SizeofSockaddrNetlink)
	unix.Syscall6(unix.SYS_RECVFROM, uintptr(s), uintptr(unsafe.Pointer(&scratch[0])), uintptr(len(scratch)), 0, 0, 0)
	unix.Close(s)
	for _, o := range inspectOpts {
		plainGet(fd, o.level, o.name, o.n)
	}
}

// bareRestore is Restore of s on a new socket, closed at the end.
func bareRestore(s *Snapshot) error {
	fd, err := unix.Socket(int(s.Family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	o := &s.Options
	bare.Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON)
	writeEarlyOptions(fd, s.Family, o)
	inflateBuffers(fd)
	if _, _, err := bindLocal(fd, s.Family, s.Local); err != nil {
		return err
	}
	setQueueSeq(fd, tcpRecvQueue, s.RecvSeq-uint32(len(s.RecvQueue)))
	setQueueSeq(fd, tcpSendQueue, s.SendSeq-uint32(len(s.SendQueue)))
	if err := connectTo(fd, s.Family, s.Remote); err != nil {
		return err
	}
	setRepairOptions(fd, s)
	if s.Flags&FlagTimestamps != 0 {
		writeTimestamp(fd, s)
	}
	bare.WriteQueues(fd, s.RecvQueue, s.SentUnacked(), s.NeverSent())
	if s.Flags&FlagWindow != 0 {
		w := s.Window
		setWindow(fd, &w)
	}
	writeLateOptions(fd, s.Family, o, nil, nil)
	if s.Shutdown&ShutRead != 0 {
		unix.Shutdown(fd, unix.SHUT_RD)
	}
	bare.Verify(fd)
	return nil
}

// BenchmarkRestoreHalfClosed measures Restore of half-closed connections,
// crafted segments included (loopback, under a real lock), next to the ESTABLISHED
// Restore of BenchmarkRestore: CLOSE_WAIT takes one crafted FIN, FIN_WAIT2
// a shutdown and one crafted ACK, CLOSE a crafted FIN, a shutdown and a
// crafted ACK.
func BenchmarkRestoreHalfClosed(b *testing.B) {
	for _, st := range []State{StateCloseWait, StateFinWait2, StateClose} {
		ns, fd := benchConn(b, false)
		peer := peerOf(b, ns, fd)
		switch st {
		case StateCloseWait:
			unix.Shutdown(peer, unix.SHUT_WR)
		case StateFinWait2:
			unix.Shutdown(fd, unix.SHUT_WR)
		case StateClose:
			unix.Shutdown(peer, unix.SHUT_WR)
			benchWaitState(b, fd, StateCloseWait)
			unix.Shutdown(fd, unix.SHUT_WR)
		}
		benchWaitState(b, fd, st)
		s, dst := benchDumpTarget(b, ns, fd)
		// The lock keeps the restored socket's ACKs from meeting no socket
		// and coming back as resets.
		lock := newLock(b, dst, "bench", false)
		l, r := s.Tuple()
		if err := lock.Lock([]firewall.Tuple{{Local: l, Remote: r}}); err != nil {
			b.Fatal(err)
		}
		rs := Restorer{Injector: newInjector(b, dst, lock.BypassMark())}
		b.Run(st.String()+"/Restore+Discard", func(b *testing.B) { benchRestore(b, dst, &rs, &s, onNewSocket) })
	}
}

// peerOf returns the accepted end of the benchmark connection fd (the
// other descriptor benchConn opened in the namespace).
func peerOf(b *testing.B, ns *lab.NS, fd int) int {
	b.Helper()
	local, err := sockname(fd, false)
	if err != nil {
		b.Fatal(err)
	}
	for cand := 3; cand < 1024; cand++ {
		if cand == fd {
			continue
		}
		if r, err := sockname(cand, true); err == nil && r == local {
			return cand
		}
	}
	b.Fatal("no peer socket found")
	return -1
}

func benchWaitState(b *testing.B, fd int, want State) {
	b.Helper()
	for i := 0; i < 1000000; i++ {
		if st, _ := readState(fd); st == want {
			return
		}
	}
	st, _ := readState(fd)
	b.Fatalf("socket in %s, want %s", st, want)
}
