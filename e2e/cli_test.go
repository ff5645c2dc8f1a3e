package e2e

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/certs"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// lanHosts builds the three hosts of the CLI tests with their addresses,
// the service address on the source.
func lanHosts(t *testing.T) (*lab.LAN, *lab.NS, *lab.NS, *lab.NS) {
	return lanHostsWith(t, svc)
}

// lanHostsWith is lanHosts with another service address (IPv6, say); every
// host has an IPv4 and an IPv6 address.
func lanHostsWith(t *testing.T, service netip.Prefix) (*lab.LAN, *lab.NS, *lab.NS, *lab.NS) {
	t.Helper()
	lan := lab.NewTestLAN(t, "peer", "src", "dst")
	peer, src, dst := lan.Host("peer"), lan.Host("src"), lan.Host("dst")
	for ns, ps := range map[*lab.NS][]netip.Prefix{peer: {peerAddr, peer6}, src: {srcAddr, src6}, dst: {dstAddr, dst6}} {
		for _, p := range ps {
			if err := ns.AddAddr(p); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := src.AddAddr(service); err != nil {
		t.Fatal(err)
	}
	return lan, peer, src, dst
}

var (
	peer6 = netip.MustParsePrefix("fd00::1/64")
	src6  = netip.MustParsePrefix("fd00::2/64")
	dst6  = netip.MustParsePrefix("fd00::3/64")
	svc6  = netip.MustParsePrefix("fd00::10/64")
)

// certFiles mints a CA and one certificate for both agents into a directory.
func certFiles(t *testing.T) (cert, key, ca string) {
	t.Helper()
	dir := t.TempDir()
	c, err := certs.NewCA("e2e CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	h, err := c.Issue("agent", []string{"198.18.0.2", "198.18.0.3"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := certs.WriteFiles(dir, c, map[string]*certs.Host{"agent": h}); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "agent.pem"), filepath.Join(dir, "agent-key.pem"), filepath.Join(dir, "ca.pem")
}

// agent starts the tcpmigrate binary in ns and returns it; its output goes
// to a file (programs it starts inherit it and may outlive it), shown in
// the test log when the test ends.
func agent(t *testing.T, ns *lab.NS, args ...string) *exec.Cmd {
	t.Helper()
	cmd := ns.Command(bin, args...)
	out, err := os.Create(filepath.Join(t.TempDir(), "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		b, _ := os.ReadFile(out.Name())
		out.Close()
		t.Logf("tcpmigrate %s:\n%s", args[0], b)
	})
	return cmd
}

// waitListening waits until something listens on addr inside ns.
func waitListening(t *testing.T, ns *lab.NS, port uint16) {
	t.Helper()
	lab.WaitFor(t, fmt.Sprintf("a listener on port %d in %s", port, ns.Label), func() (bool, string) {
		out, err := ns.Exec("ss", "-Htln", fmt.Sprintf("sport = :%d", port))
		return len(bytes.TrimSpace(out)) > 0, fmt.Sprintf("ss: %v %q", err, out)
	})
}

// TestCLIPidExec moves the connection of an unmodified program (socat,
// writing what it receives to a file) with `send --pid`, and hands it to a
// new socat started by `receive --exec`. Data the peer sent while the old
// socat was stopped waits in the kernel's queues, moves with the socket and
// is written by the new socat: the two files together hold every byte the
// peer sent, once and in order, and nobody sees a reset.
func TestCLIPidExec(t *testing.T) {
	for _, tc := range []struct {
		name    string
		service netip.Prefix
		listen  string // socat's listening address
	}{
		{"ipv4", svc, fmt.Sprintf("TCP-LISTEN:%d,bind=%s,reuseaddr", svcPort, svc.Addr())},
		{"ipv6", svc6, fmt.Sprintf("TCP6-LISTEN:%d,bind=[%s],reuseaddr", svcPort, svc6.Addr())},
		// A dual-stack socket talking to an IPv4 peer: IPv4-mapped addresses.
		{"dual-stack", svc, fmt.Sprintf("TCP6-LISTEN:%d,bind=[::ffff:%s],ipv6only=0,reuseaddr", svcPort, svc.Addr())},
	} {
		t.Run(tc.name, func(t *testing.T) { testCLIPidExec(t, tc.service, tc.listen) })
	}
}

func testCLIPidExec(t *testing.T, service netip.Prefix, listen string) {
	r := newSocatRun(t, service, listen)
	receiver := agent(t, r.dst, r.receiveArgs("--once")...)
	waitListening(t, r.dst, 7946)

	// A: read and written by the old socat. C: sent while it is stopped, so
	// it waits in the socket's receive queue. D: sent after the move.
	if err := r.send(256 << 10); err != nil {
		t.Fatal(err)
	}
	waitFileSize(t, r.srcOut, r.off)
	r.workload.Process.Signal(syscall.SIGSTOP)
	if err := r.send(64 << 10); err != nil {
		t.Fatal(err)
	}

	// Every established connection of socat, to the target.
	out, err := exec.Command(bin, "list", "--pid", strconv.Itoa(r.workload.Process.Pid)).CombinedOutput()
	t.Logf("list:\n%s", out)
	if err != nil || !strings.Contains(string(out), "yes") {
		t.Fatalf("list --pid: %v", err)
	}
	sendCmd := r.src.Command(bin, r.sendArgs("--json")...)
	var sendOut, sendErr bytes.Buffer
	sendCmd.Stdout, sendCmd.Stderr = &sendOut, &sendErr
	err = sendCmd.Run()
	t.Logf("send: %s\n%s", sendOut.String(), sendErr.String())
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	if !strings.Contains(sendOut.String(), `"outcome": "committed"`) {
		t.Fatal("send did not report the connection committed")
	}
	if err := receiver.Wait(); err != nil {
		t.Fatalf("receive --once: %v", err)
	}
	// The old socat was killed (--after kill, the default).
	if err := r.workload.Wait(); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("old socat: %v, want killed", err)
	}
	if err := r.send(512 << 10); err != nil {
		t.Fatal(err)
	}
	if got := r.delivered(); got != "target" {
		t.Errorf("the connection is on the %s", got)
	}
	r.quiet()
}
