package repair

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/firewall"
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
			ns.Do(func() error {
				b.ReportAllocs()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					bareInspect(fd)
					bareCapture(fd, buf)
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
		b.Run(q.name+"/Restore+Discard", func(b *testing.B) {
			err := dst.Do(func() error {
				b.ReportAllocs()
				for i := 0; i < b.N; i++ {
					rfd, err := Restore(&s)
					if err != nil {
						return err
					}
					unix.Close(rfd) // still in repair mode: silent
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
		// The part of a restore inside the freeze when the socket was made
		// before it (NewBlank, untimed) and the namespace's defaults are
		// known: what the target does per connection after the lock.
		b.Run(q.name+"/RestoreBlank+Discard", func(b *testing.B) {
			// Errors are returned, not b.Fatal'd: Fatal inside Do would
			// end the goroutine Do waits for, and the run would hang.
			err := dst.Do(func() error {
				d, err := ReadDefaults()
				if err != nil {
					return err
				}
				r := Restorer{Defaults: d}
				b.ReportAllocs()
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					blank, err := NewBlank(s.Local)
					if err != nil {
						return err
					}
					b.StartTimer()
					rfd, err := r.RestoreBlank(blank, &s)
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
		})
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

// The bare sequences below make the same system calls as Inspect, Capture
// and Restore, in the same order, with no checks, no error wrapping and no
// struct filling: the floor that the real functions are compared with.
// bareCapture reads only the values that decide which calls Capture makes
// (data in flight, a send queue to peek, a receive queue to re-read).

var scratch [8192]byte

func rawGet(fd, level, opt int, n uint32) {
	l := n
	unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&scratch[0])), uintptr(unsafe.Pointer(&l)), 0)
}

func rawSet(fd, level, opt int, v int32) {
	unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0)
}

func rawIoctl(fd int, req uint) int32 {
	var v int32
	unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&v)))
	return v
}

func bareInspect(fd int) {
	rawGet(fd, unix.SOL_SOCKET, unix.SO_DOMAIN, 4)
	rawGet(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL, 4)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_INFO, tcpInfoPrefix)
	l := uint32(128)
	unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&scratch[0])), uintptr(unsafe.Pointer(&l)))
	unix.RawSyscall(unix.SYS_GETPEERNAME, uintptr(fd), uintptr(unsafe.Pointer(&scratch[0])), uintptr(unsafe.Pointer(&l)))
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 4)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_ULP, 16)
	rawGet(fd, unix.IPPROTO_TCP, tcpAOInfo, 64)
	rawIoctl(fd, unix.SIOCATMARK)
	rawGet(fd, unix.SOL_SOCKET, unix.SO_BINDTOIFINDEX, 4)
	rawGet(fd, unix.SOL_SOCKET, unix.SO_COOKIE, 8)
	// The sock_diag lookup: socket, request, answer, close.
	s, _ := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	var req [unix.NLMSG_HDRLEN + inetDiagReqLen]byte
	req[0], req[4], req[6], req[16], req[17], req[18] = byte(len(req)), unix.SOCK_DIAG_BY_FAMILY, unix.NLM_F_REQUEST, unix.AF_INET, unix.IPPROTO_TCP, 2
	var sa unix.RawSockaddrNetlink
	sa.Family = unix.AF_NETLINK
	unix.Syscall6(unix.SYS_SENDTO, uintptr(s), uintptr(unsafe.Pointer(&req[0])), uintptr(len(req)), 0, uintptr(unsafe.Pointer(&sa)), unix.SizeofSockaddrNetlink)
	unix.Syscall6(unix.SYS_RECVFROM, uintptr(s), uintptr(unsafe.Pointer(&scratch[0])), uintptr(len(scratch)), 0, 0, 0)
	unix.Close(s)
	// The options: as many getsockopt calls as readOptions makes on IPv4.
	for i := 0; i < 4+len(boolOpts)+len(intOpts)+len(uintOpts)+len(optionalOpts)+11; i++ {
		rawGet(fd, unix.SOL_SOCKET, unix.SO_PRIORITY, 4)
	}
}

func bareCapture(fd int, buf []byte) {
	var first, last tcpInfoHead
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1)
	getsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&first), tcpInfoSize)
	outq := first.NotsentBytes
	if first.Unacked != 0 {
		outq = uint32(rawIoctl(fd, unix.SIOCOUTQ))
	}
	inq := rawIoctl(fd, unix.SIOCINQ)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_MAXSEG, 4)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP, 4)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, repairWindowSize)
	for _, q := range []int32{tcpRecvQueue, tcpSendQueue} {
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, q)
		rawGet(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, 4)
		if q == tcpRecvQueue || outq > 0 {
			unix.Syscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
		}
	}
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue)
	getsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&last), tcpInfoSize)
	if inq > 0 {
		rawIoctl(fd, unix.SIOCINQ)
	}
}

func bareRestore(s *Snapshot) error {
	fd, err := unix.Socket(int(s.Family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return err
	}
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1)
	if s.Options.Mark != 0 {
		rawSet(fd, unix.SOL_SOCKET, unix.SO_MARK, int32(s.Options.Mark))
	}
	rawSet(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 1<<30)
	rawSet(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 1<<30)
	if err := bindRaw(fd, s.Family, s.Local); err != nil {
		return err
	}
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue)
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, int32(s.RecvSeq-uint32(len(s.RecvQueue))))
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpSendQueue)
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, int32(s.SendSeq-uint32(len(s.SendQueue))))
	if err := connectTo(fd, s.Family, s.Remote); err != nil {
		return err
	}
	setRepairOptions(fd, s)
	rawSet(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP, int32(s.Timestamp))
	if len(s.RecvQueue) > 0 {
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue)
		send(fd, s.RecvQueue)
	}
	if s.Unsent > 0 {
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, -1)
		send(fd, s.NeverSent())
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1)
	} else {
		rawSet(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue)
	}
	w := s.Window
	setWindow(fd, &w)
	// As many setsockopt calls as writeLateOptions makes on IPv4 for a
	// connection whose options are the defaults: not IP_TOS, the on/off
	// options, SO_PRIORITY, SO_RCVLOWAT, TCP_USER_TIMEOUT and
	// TCP_NOTSENT_LOWAT (already right on the new socket).
	for i := 0; i < 4+len(intOpts)-2+3; i++ {
		rawSet(fd, unix.SOL_SOCKET, unix.SO_PRIORITY, 0)
	}
	rawIoctl(fd, unix.SIOCOUTQ)
	rawIoctl(fd, unix.SIOCOUTQNSD)
	rawIoctl(fd, unix.SIOCINQ)
	rawGet(fd, unix.IPPROTO_TCP, unix.TCP_INFO, tcpInfoPrefix)
	return unix.Close(fd)
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
		lock, err := firewall.New(firewall.Config{Instance: "bench", NetNS: dst.Handle()})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { lock.Close() })
		l, r := s.Tuple()
		if err := lock.Lock([]firewall.Tuple{{Local: l, Remote: r}}); err != nil {
			b.Fatal(err)
		}
		var rs Restorer
		if err := dst.Do(func() (err error) { rs.Injector, err = NewInjector(lock.BypassMark()); return err }); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { rs.Injector.Close() })
		b.Run(st.String()+"/Restore+Discard", func(b *testing.B) {
			err := dst.Do(func() error {
				b.ReportAllocs()
				for i := 0; i < b.N; i++ {
					rfd, err := rs.Restore(&s)
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
		})
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
