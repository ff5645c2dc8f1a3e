// Package bare makes the bare system calls that the benchmarks of package
// repair and the calibration of internal/bench time repair's Capture and
// Restore against (their floor): getsockopt, setsockopt and ioctl by the
// raw route, with no error handling, Capture's whole sequence, and the
// queue sequences, queue writes and final check of Restore's. It must not import repair,
// whose in-package benchmarks use it; where it copies one of repair's
// unexported values, a test of repair pins the copy.
package bare

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	// MaxRawPeek is repair's maxRawPeek (repair/sys.go): a peek of up
	// to this many bytes is made with a raw call, a larger one through
	// the scheduler.
	MaxRawPeek = 64 << 10
	// InfoLen is the length of TCP_INFO that repair reads (its
	// tcpInfoHead: struct tcp_info up to tcpi_min_rtt).
	InfoLen = 152

	tcpNoQueue        = 0  // TCP_NO_QUEUE
	tcpRecvQueue      = 1  // TCP_RECV_QUEUE
	tcpSendQueue      = 2  // TCP_SEND_QUEUE
	tcpiOptTimestamps = 1  // TCPI_OPT_TIMESTAMPS
	repairWindowSize  = 20 // sizeof(struct tcp_repair_window)
)

// Get reads option opt of fd into the n bytes at p.
func Get(fd, level, opt int, p unsafe.Pointer, n uint32) {
	l := n
	unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
}

// Set sets the integer option opt of fd to v.
func Set(fd, level, opt int, v int32) {
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0)
}

// SetN sets option opt of fd to the n bytes at p.
func SetN(fd, level, opt int, p unsafe.Pointer, n uint32) {
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(n), 0)
}

// SetQueueSeqs makes the calls of repair's Restore that set where each
// queue of fd, a new socket in repair mode, starts (R7): the receive
// queue's, then the send queue's, which stays selected.
func SetQueueSeqs(fd int, recv, send uint32) {
	Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue)
	Set(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, int32(recv))
	Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpSendQueue)
	Set(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, int32(send))
}

// Ioctl makes the ioctl req, which reads an integer, on fd.
func Ioctl(fd int, req uint) int32 {
	var v int32
	unix.RawSyscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&v)))
	return v
}

// Peek peeks want+1 bytes of the selected queue of fd into *buf, grown as
// repair's peekQueue grows a Snapshot's buffer, by the route repair's peek
// takes (raw up to MaxRawPeek).
func Peek(fd int, buf *[]byte, want int) {
	if len(*buf) < want+1 {
		*buf = make([]byte, want+1)
	}
	call := unix.RawSyscall6
	if want+1 > MaxRawPeek {
		call = unix.Syscall6
	}
	call(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&(*buf)[0])), uintptr(want+1), unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
}

// Capture makes the system calls of repair.Capture on fd, an inspected
// ESTABLISHED connection (peekOff: its owner set SO_PEEK_OFF), in order:
// repair on (and SO_PEEK_OFF cleared if set), TCP_INFO, SIOCOUTQ with data
// in flight, SIOCINQ, MSS, timestamp (if negotiated), window, the receive
// queue's sequence and peek, the send queue's sequence and peek (only when
// it holds something), deselect, TCP_INFO again, and SIOCINQ again when
// the receive queue held data. The peeks go into *buf, grown as needed.
func Capture(fd int, peekOff bool, buf *[]byte) {
	var scratch [repairWindowSize]byte
	var first, last unix.TCPInfo
	p := unsafe.Pointer(&scratch[0])
	Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON)
	if peekOff {
		Set(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, -1)
	}
	Get(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&first), InfoLen)
	outq := int32(first.Notsent_bytes)
	if first.Unacked != 0 {
		outq = Ioctl(fd, unix.SIOCOUTQ)
	}
	inq := Ioctl(fd, unix.SIOCINQ)
	Get(fd, unix.IPPROTO_TCP, unix.TCP_MAXSEG, p, 4)
	if first.Options&tcpiOptTimestamps != 0 {
		Get(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP, p, 4)
	}
	Get(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, p, repairWindowSize)
	Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue)
	Get(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, p, 4)
	Peek(fd, buf, int(inq))
	Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpSendQueue)
	Get(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, p, 4)
	if outq > 0 {
		Peek(fd, buf, int(outq))
	}
	Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue)
	Get(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&last), InfoLen)
	if inq > 0 {
		Ioctl(fd, unix.SIOCINQ)
	}
}

// send writes b to fd with one send(2), through the scheduler, as repair's
// send does.
func send(fd int, b []byte) {
	if len(b) > 0 {
		unix.Syscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT, 0, 0)
	}
}

// WriteQueues makes the queue writes of repair's Restore (R11 to R13) on
// fd, a socket in repair mode whose send queue is selected (R7 left it
// so): recv into the receive queue, sent (in flight) into the send queue,
// unsent with repair off (TCP_REPAIR_OFF_NO_WP) and on again, or, with
// nothing unsent, the deselect.
func WriteQueues(fd int, recv, sent, unsent []byte) {
	if len(recv) > 0 {
		Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue)
		send(fd, recv)
	}
	if len(sent) > 0 {
		if len(recv) > 0 {
			Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpSendQueue)
		}
		send(fd, sent)
	}
	if len(unsent) > 0 {
		Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP)
		send(fd, unsent)
		Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON)
	} else {
		Set(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue)
	}
}

// Verify makes the reads of repair's check of an ESTABLISHED restore
// (verifyRestored) on fd: TCP_INFO, SIOCOUTQ with data in flight, SIOCINQ.
func Verify(fd int) {
	var ti unix.TCPInfo
	Get(fd, unix.IPPROTO_TCP, unix.TCP_INFO, unsafe.Pointer(&ti), InfoLen)
	if ti.Unacked != 0 {
		Ioctl(fd, unix.SIOCOUTQ)
	}
	Ioctl(fd, unix.SIOCINQ)
}
