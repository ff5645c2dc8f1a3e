package e2e

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
)

// fault is one case of the crash matrix run with the real binaries.
type fault struct {
	side   string // "source" or "target": the agent that stops at the step
	step   string
	action string // "kill" (SIGKILL the agent there) or "cut" (drop the link in the switch)
	// want is where the connection ends: "source", "target", or "lost"
	// (the documented case: the target died with live sockets).
	want string
}

var faultMatrix = []fault{
	{"source", "prepare", "kill", "source"},
	{"source", "capture", "kill", "source"},
	{"source", "verdicts", "kill", "source"},
	{"source", "switch", "kill", "source"},
	{"source", "commit", "kill", "source"},
	{"source", "finish", "kill", "target"},
	{"target", "prepare", "kill", "source"},
	{"target", "restore", "kill", "source"},
	{"target", "prepared", "kill", "source"},
	{"target", "switch", "kill", "source"},
	{"target", "commit", "kill", "source"},
	{"target", "deliver", "kill", "lost"},
	{"source", "prepare", "cut", "source"},
	{"source", "capture", "cut", "source"},
	{"source", "verdicts", "cut", "source"},
	{"source", "switch", "cut", "source"},
	{"source", "commit", "cut", "source"},
}

// TestCLIFaultMatrix stops an agent at a step of the handoff and kills it
// there, or cuts the link between the agents in the switch, with an
// unmodified program's live connection in flight (send --pid, receive
// --exec). Each case ends with the connection alive on exactly one host
// with every byte the peer sent delivered once and in order (after
// `tcpmigrate recover` where an agent died or the outcome was in doubt),
// or, in the one documented case (the target killed after it resumed the
// sockets), lost. docs/faults.md lists the cases and outcomes.
func TestCLIFaultMatrix(t *testing.T) {
	for _, f := range faultMatrix {
		t.Run(f.side+"-"+f.step+"-"+f.action, func(t *testing.T) { runCLIFault(t, f) })
	}
}

func runCLIFault(t *testing.T, f fault) {
	lan, peer, src, dst := lanHosts(t)
	cert, key, ca := certFiles(t)
	dir := t.TempDir()
	srcOut, dstOut := filepath.Join(dir, "src.out"), filepath.Join(dir, "dst.out")
	tls := []string{"--cert", cert, "--key", key, "--ca", ca}
	marker := filepath.Join(dir, "hung")
	hang := func(cmd *exec.Cmd) {
		mode := "hang"
		if f.action == "cut" {
			mode = "pause"
		}
		cmd.Env = append(os.Environ(), "TCPMIGRATE_TEST_HANG="+f.step, "TCPMIGRATE_TEST_HANG_FILE="+marker, "TCPMIGRATE_TEST_HANG_MODE="+mode)
	}
	startReceiver := func(withHang bool) *exec.Cmd {
		args := append([]string{"receive", "--listen", "198.18.0.3:7946", "--claim-addr", svc.String(), "--dev", "eth0",
			"--journal-dir", filepath.Join(dir, "jt")}, tls...)
		args = append(args, "--exec", "--", "socat", "-u", "FD:3", "OPEN:"+dstOut+",creat,append")
		cmd := dst.Command(bin, args...)
		if withHang {
			hang(cmd)
		}
		logf, _ := os.Create(filepath.Join(dir, fmt.Sprintf("receive-%d.log", time.Now().UnixNano())))
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); logf.Close() })
		waitListening(t, dst, 7946)
		return cmd
	}
	receiver := startReceiver(f.side == "target")

	workload := src.Command("socat", "-u", fmt.Sprintf("TCP-LISTEN:%d,bind=%s,reuseaddr", svcPort, svc.Addr()), "OPEN:"+srcOut+",creat,append")
	if err := workload.Start(); err != nil {
		t.Fatal(err)
	}
	defer workload.Process.Kill()
	waitListening(t, src, svcPort)
	var c net.Conn
	if err := peer.Do(func() (err error) {
		c, err = net.Dial("tcp", netip.AddrPortFrom(svc.Addr(), svcPort).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	capture, err := lan.CaptureFlags(svcPort, false, filepath.Join(dir, "cap.pcap"))
	if err != nil {
		t.Fatal(err)
	}
	before, _ := peer.Resets()
	var off int64
	send := func(n int64) error {
		buf := make([]byte, n)
		streamcheck.Pattern(buf, 0, off)
		off += n
		c.SetWriteDeadline(time.Now().Add(10 * time.Second))
		_, err := c.Write(buf)
		return err
	}
	if err := send(64 << 10); err != nil {
		t.Fatal(err)
	}
	waitFileSize(t, srcOut, off)

	sender := src.Command(bin, append([]string{"send", "--to", "198.18.0.3:7946", "--pid", strconv.Itoa(workload.Process.Pid),
		"--release-addr", svc.String(), "--dev", "eth0", "--lease", "30s", "--timeout", "5s",
		"--journal-dir", filepath.Join(dir, "js")}, tls...)...)
	if f.side == "source" {
		hang(sender)
	}
	var sendOut bytes.Buffer
	sender.Stdout, sender.Stderr = &sendOut, &sendOut
	if err := sender.Start(); err != nil {
		t.Fatal(err)
	}
	defer sender.Process.Kill()
	waitFile(t, marker)
	if err := send(16 << 10); err != nil { // waits in the frozen socket's queue
		t.Fatal(err)
	}
	switch {
	case f.action == "kill" && f.side == "source":
		sender.Process.Kill()
	case f.action == "kill":
		receiver.Process.Kill()
	case f.action == "cut":
		cutLink(t, lan.Switch)
		os.Remove(marker)
	}
	sendErr := sender.Wait()
	t.Logf("send (%v):\n%s", sendErr, sendOut.String())
	if f.action == "cut" {
		if out, err := lan.Switch.Exec("nft", "delete", "table", "bridge", "cut"); err != nil {
			t.Fatalf("restore the link: %v %s", err, out)
		}
	}
	if f.action == "kill" && f.side == "target" {
		receiver.Wait()
		startReceiver(false) // the target agent comes back, with its journal
	}
	if sendErr != nil {
		recoverAll(t, src, tls, filepath.Join(dir, "js"))
	}

	if f.want == "lost" {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("the connection the dead target had resumed is still alive at the peer")
		}
		capture.Stop()
		return
	}
	if err := send(128 << 10); err != nil {
		t.Fatal(err)
	}
	// Where did the connection end up? All bytes, once, across both files.
	if err := waitFor(20*time.Second, func() bool { return size(srcOut)+size(dstOut) >= off }); err != nil {
		t.Fatalf("only %d+%d of %d bytes arrived", size(srcOut), size(dstOut), off)
	}
	b := append(read(srcOut), read(dstOut)...)
	want := make([]byte, off)
	streamcheck.Pattern(want, 0, 0)
	if !bytes.Equal(b, want) {
		t.Errorf("the two hosts' output is not the stream the peer sent (%d+%d bytes)", size(srcOut), size(dstOut))
	}
	got := "source"
	if size(dstOut) > 0 {
		got = "target"
	}
	if got != f.want {
		t.Errorf("the connection ended on the %s, want the %s", got, f.want)
	}
	if out, _ := src.Exec("nft", "list", "tables"); bytes.Contains(out, []byte("tcpmigrate")) {
		t.Errorf("a lock table is left on the source:\n%s", out)
	}
	after, _ := peer.Resets()
	if after != before {
		t.Errorf("the peer counted %d resets", after-before)
	}
	segs, err := capture.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if len(segs) != 0 {
		t.Errorf("RST or FIN on the bridge:\n%v", segs)
	}
}

// cutLink drops the agents' link (port 7946) in the switch.
func cutLink(t *testing.T, sw *lab.NS) {
	t.Helper()
	cmd := sw.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader("table bridge cut {\n chain f {\n  type filter hook forward priority 0;\n  tcp dport 7946 drop\n  tcp sport 7946 drop\n }\n}\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cut the link: %v %s", err, out)
	}
}

// recoverAll runs `tcpmigrate recover` on the source until it has nothing
// left to do (the target may need a few seconds to notice and abort).
func recoverAll(t *testing.T, src *lab.NS, tls []string, journal string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := src.Exec(bin, append([]string{"recover", "--journal-dir", journal}, tls...)...)
		t.Logf("recover: %v\n%s", err, out)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("recover did not finish")
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func size(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

func read(path string) []byte {
	b, _ := os.ReadFile(path)
	return b
}
