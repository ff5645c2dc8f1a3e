package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/fdpass"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
)

const vmMAC = "02:00:c6:12:00:0a"

// TestScriptedVMMigration runs e2e/testdata/vm-migrate.sh, an operator's
// script around a hypervisor: a "VM" (a workload with its own MAC and
// address on a macvlan) serves long-lived connections from the peer that
// stream checksummed data both ways; the script starts the VM's arrival on
// the target, `tcpmigrate receive --deliver` there and `tcpmigrate send
// --handoff` on the source, whose --on-switch hook moves the VM's NIC (MAC
// and address) like a hypervisor. The peer sees every byte once and in
// order both ways, no reset, and a capture on the bridge shows no RST and
// no FIN; the stall each peer connection saw is measured from the peer.
func TestScriptedVMMigration(t *testing.T) {
	const n = 8
	lan := lab.NewTestLAN(t, "peer", "src", "dst")
	peer, src, dst := lan.Host("peer"), lan.Host("src"), lan.Host("dst")
	for ns, p := range map[*lab.NS]netip.Prefix{peer: peerAddr, src: srcAddr, dst: dstAddr} {
		if err := ns.AddAddr(p); err != nil {
			t.Fatal(err)
		}
	}
	// The VM's NIC on the source: its own MAC and address.
	for _, args := range [][]string{
		{"link", "add", "vm0", "link", "eth0", "address", vmMAC, "type", "macvlan", "mode", "bridge"},
		{"addr", "add", svc.String(), "dev", "vm0", "nodad"},
		{"link", "set", "vm0", "up"},
	} {
		if err := src.IP(args...); err != nil {
			t.Fatal(err)
		}
	}
	cert, _, _ := certFiles(t)
	dir := t.TempDir()
	self, _ := os.Executable()

	// The VM's workload on the source.
	vm := src.Command(self)
	vm.Env = append(os.Environ(), "TCPM_E2E_HELPER=vm-workload", "TCPM_N="+strconv.Itoa(n),
		"TCPM_ADDR="+netip.AddrPortFrom(svc.Addr(), svcPort).String(), "TCPM_HANDOFF="+filepath.Join(dir, "handoff.sock"))
	vmOut, _ := vm.StdoutPipe()
	vm.Stderr = os.Stderr
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	defer vm.Process.Kill()
	vmLines := bufio.NewScanner(vmOut)
	if !vmLines.Scan() || vmLines.Text() != "listening" {
		t.Fatalf("vm workload: %q", vmLines.Text())
	}
	var clients []*streamcheck.Endpoint
	for range n {
		var c net.Conn
		if err := peer.Do(func() (err error) {
			c, err = net.Dial("tcp", netip.AddrPortFrom(svc.Addr(), svcPort).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ep := streamcheck.NewEndpoint(0, 1)
		ep.Interval = time.Millisecond
		ep.Start(c.(*net.TCPConn))
		clients = append(clients, ep)
	}
	watch := startWatch(t, lan, peer, false)
	time.Sleep(300 * time.Millisecond)

	arrivalOut := filepath.Join(dir, "arrival.out")
	t.Cleanup(func() { // the arrival outlives a failed script otherwise
		if pid, err := strconv.Atoi(strings.TrimSpace(string(read(filepath.Join(dir, "arrival.pid"))))); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	script := exec.Command("sh", "testdata/vm-migrate.sh")
	script.Env = append(os.Environ(), "SRC="+src.Name, "DST="+dst.Name, "TCPMIGRATE="+bin, "CERTS="+filepath.Dir(cert),
		"VM_PID="+strconv.Itoa(vm.Process.Pid), "VM_ADDR="+svc.String(), "VM_MAC="+vmMAC, "WORK="+dir,
		fmt.Sprintf("ARRIVAL=TCPM_E2E_HELPER=vm-arrival TCPM_DELIVER=%s exec %s > %s 2>&1", filepath.Join(dir, "deliver.sock"), self, arrivalOut))
	out, err := script.CombinedOutput()
	send, _ := os.ReadFile(filepath.Join(dir, "send.json"))
	t.Logf("vm-migrate.sh: %v\n%s\nsend: %s", err, out, send)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Wait(); err != nil {
		t.Errorf("the VM's old workload: %v", err)
	}
	time.Sleep(500 * time.Millisecond) // the streams go on from the target
	for i, cl := range clients {
		cl.Pause()
		if err := cl.Err(); err != nil {
			t.Errorf("peer connection %d: %v", i, err)
		}
	}
	// Judge the wire before the arrival is told to stop: stopping closes its
	// connections, and those FINs are the test's, not the migration's.
	watch.quiet(t)
	// The arrival checks its side of every stream when told to stop.
	var arrival int
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "arrival="); ok {
			arrival, _ = strconv.Atoi(v)
		}
	}
	if arrival == 0 {
		t.Fatal("the script did not say which process is the arrival")
	}
	syscall.Kill(arrival, syscall.SIGTERM)
	lab.WaitFor(t, "the arrival's report", func() (bool, string) {
		b, _ := os.ReadFile(arrivalOut)
		return len(b) > 0 && b[len(b)-1] == '\n', fmt.Sprintf("%q", b)
	})
	if b, _ := os.ReadFile(arrivalOut); string(b) != "ok\n" {
		t.Errorf("the VM on the target: %s", b)
	}
	var stall time.Duration
	for _, cl := range clients {
		stall = max(stall, cl.MaxGap())
	}
	t.Logf("longest stall seen by a peer connection: %s", stall)
}

// vmWorkload is the VM's workload on the source: it serves TCPM_N
// connections on TCPM_ADDR, streaming both ways, and on SIGUSR1 hands them
// with their offsets to the source agent at TCPM_HANDOFF.
func vmWorkload() int {
	n, _ := strconv.Atoi(os.Getenv("TCPM_N"))
	ln, err := net.Listen("tcp", os.Getenv("TCPM_ADDR"))
	if err != nil {
		fmt.Println("listen:", err)
		return 1
	}
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	fmt.Println("listening")
	var conns []*net.TCPConn
	var eps []*streamcheck.Endpoint
	for range n {
		c, err := ln.Accept()
		if err != nil {
			return 1
		}
		ep := streamcheck.NewEndpoint(1, 0)
		ep.Interval = time.Millisecond
		ep.Start(c.(*net.TCPConn))
		conns, eps = append(conns, c.(*net.TCPConn)), append(eps, ep)
	}
	<-usr1
	var items []fdpass.Item
	for i, c := range conns {
		eps[i].Pause()
		if err := eps[i].Err(); err != nil {
			fmt.Fprintln(os.Stderr, "vm workload:", err)
			return 1
		}
		f, _ := c.File()
		items = append(items, fdpass.Item{File: f, Local: c.LocalAddr().(*net.TCPAddr).AddrPort(),
			Remote: c.RemoteAddr().(*net.TCPAddr).AddrPort(), ID: uint64(i),
			State: eps[i].State()})
	}
	hc, err := fdpass.Dial(context.Background(), os.Getenv("TCPM_HANDOFF"), fdpass.Limits{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "vm workload:", err)
		return 1
	}
	defer hc.Close()
	if err := hc.SendSockets(items); err != nil {
		fmt.Fprintln(os.Stderr, "vm workload:", err)
		return 1
	}
	fdpass.CloseItems(items)
	m, err := hc.Receive()
	if err != nil || m.Kind != fdpass.KindCommitted || len(m.IDs) != n {
		fmt.Fprintf(os.Stderr, "vm workload: %v %v\n", m.Kind, err)
		return 1
	}
	return 0 // the old copies close with the process: in repair mode, silently
}

// vmArrival is the VM's workload on the target: it takes the delivered
// sockets and carries on each stream from its offsets; on SIGTERM it stops
// and prints "ok" or what went wrong.
func vmArrival() int {
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	dl, err := fdpass.Listen(os.Getenv("TCPM_DELIVER"), fdpass.Policy{})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer dl.Close()
	c, err := dl.Accept()
	if err != nil {
		fmt.Println(err)
		return 1
	}
	items, err := c.RecvSockets()
	if err != nil {
		fmt.Println(err)
		return 1
	}
	var eps []*streamcheck.Endpoint
	var ids []uint64
	for _, it := range items {
		nc, err := net.FileConn(it.File)
		it.File.Close()
		if err != nil {
			fmt.Println(err)
			return 1
		}
		ep := streamcheck.NewEndpoint(1, 0)
		ep.Interval = time.Millisecond
		if err := ep.SetState(it.State); err != nil {
			fmt.Println(err)
			return 1
		}
		ep.Start(nc.(*net.TCPConn))
		eps, ids = append(eps, ep), append(ids, it.ID)
	}
	c.SendAck(ids)
	c.Close()
	<-term
	for _, ep := range eps {
		ep.Pause()
		if err := ep.Err(); err != nil {
			fmt.Println(err)
			return 1
		}
	}
	fmt.Println("ok")
	return 0
}
