package source

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/transport"
)

// testMigration is a migration with n eligible connections and nothing
// else: enough for the bookkeeping that needs no socket, lock or link.
func testMigration(n int) *migration {
	m := &migration{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	m.res.Conns = make([]ConnResult, n)
	for i := range n {
		c := &conn{index: uint32(i), fd: -1, res: &m.res.Conns[i]}
		m.conns = append(m.conns, c)
		m.elig = append(m.elig, c)
	}
	return m
}

// TestVerdictsMustAnswerASnapshot checks that the source acts on a verdict
// only for a connection whose snapshot it sent, and only once: a verdict
// before the capture, or a second one (in the same batch or a later one),
// is a protocol error, so that it can neither settle a connection the
// streams then capture nor count twice towards PREPARED.
func TestVerdictsMustAnswerASnapshot(t *testing.T) {
	ok := func(i uint32) transport.Verdict { return transport.Verdict{Index: i, Code: transport.VerdictOK} }

	m := testMigration(3)
	m.elig[0].captured = true
	if err := m.applyVerdicts([]transport.Verdict{ok(1)}); err == nil {
		t.Error("a verdict for a connection not captured yet was accepted")
	}
	if m.elig[1].done || m.elig[1].verdict {
		t.Error("the premature verdict settled the connection")
	}
	if err := m.applyVerdicts([]transport.Verdict{ok(0)}); err != nil {
		t.Fatalf("the verdict for a captured connection: %v", err)
	}
	if err := m.applyVerdicts([]transport.Verdict{ok(0)}); err == nil {
		t.Error("a second verdict for connection 0 was accepted")
	}

	m = testMigration(2)
	m.elig[0].captured, m.elig[1].captured = true, true
	if err := m.applyVerdicts([]transport.Verdict{ok(1), ok(1)}); err == nil {
		t.Error("two verdicts for connection 1 in one batch were accepted")
	}
	if err := m.applyVerdicts([]transport.Verdict{ok(5)}); err == nil {
		t.Error("a verdict for an unknown connection was accepted")
	}
}

// TestSettleSkipsCommittedPending checks that settleListeners does not
// reset a connection taken from an accept queue that the commit already
// settled (delivered or lost on the target: finish closed its socket):
// its descriptor number may belong to another socket by then, which must
// keep its SO_LINGER and stay open.
func TestSettleSkipsCommittedPending(t *testing.T) {
	other, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(other)
	closed, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	closed.Close()

	m := testMigration(1)
	lost := errors.New("target could not deliver")
	c := m.conns[0]
	c.pendingOn = &listener{}
	c.File, c.fd = closed, other // the closed socket's number, reused
	c.done, c.committed = true, true
	c.res.Outcome, c.res.Err = Failed, lost
	m.state = StateCommitted

	m.settleListeners()

	l, err := unix.GetsockoptLinger(other, unix.SOL_SOCKET, unix.SO_LINGER)
	if err != nil {
		t.Fatalf("the socket that reused the number: %v", err)
	}
	if l.Onoff != 0 {
		t.Error("settleListeners set SO_LINGER on a descriptor number finish had already closed")
	}
	if errors.Is(c.res.Err, ErrPendingLost) || !errors.Is(c.res.Err, lost) {
		t.Errorf("the committed connection's error became %v", c.res.Err)
	}
}
