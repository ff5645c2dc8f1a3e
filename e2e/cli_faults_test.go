package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
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
	// Killed after the switch released the address, before the target was
	// told: recover must ask the target and claim the address back.
	{"source", "switched", "kill", "source"},
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
	{"target", "prepare", "cut", "source"},
	{"target", "restore", "cut", "source"},
	{"target", "prepared", "cut", "source"},
	{"target", "switch", "cut", "source"},
	{"target", "commit", "cut", "target"},
	{"target", "deliver", "cut", "target"},
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
	r := newSocatRun(t, svc, socatListen(svc))
	marker := filepath.Join(r.dir, "hung")
	hang := func(cmd *exec.Cmd) {
		mode := "hang"
		if f.action == "cut" {
			mode = "pause"
		}
		cmd.Env = append(os.Environ(), "TCPMIGRATE_TEST_HANG="+f.step, "TCPMIGRATE_TEST_HANG_FILE="+marker, "TCPMIGRATE_TEST_HANG_MODE="+mode)
	}
	startReceiver := func(withHang bool) *exec.Cmd {
		cmd := r.dst.Command(bin, r.receiveArgs()...)
		if withHang {
			hang(cmd)
		}
		logf, _ := os.Create(filepath.Join(r.dir, fmt.Sprintf("receive-%d.log", time.Now().UnixNano())))
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); logf.Close() })
		waitListening(t, r.dst, 7946)
		return cmd
	}
	receiver := startReceiver(f.side == "target")
	if err := r.send(64 << 10); err != nil {
		t.Fatal(err)
	}
	waitFileSize(t, r.srcOut, r.off)

	sender := r.src.Command(bin, r.sendArgs("--lease", "30s", "--timeout", "5s")...)
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
	if err := r.send(16 << 10); err != nil { // waits in the frozen socket's queue
		t.Fatal(err)
	}
	switch {
	case f.action == "kill" && f.side == "source":
		sender.Process.Kill()
	case f.action == "kill":
		receiver.Process.Kill()
	case f.action == "cut":
		cutLink(t, r.lan.Switch)
		os.Remove(marker)
	}
	sendErr := sender.Wait()
	t.Logf("send (%v):\n%s", sendErr, sendOut.String())
	if f.action == "cut" {
		if out, err := r.lan.Switch.Exec("nft", "delete", "table", "bridge", "cut"); err != nil {
			t.Fatalf("restore the link: %v %s", err, out)
		}
	}
	if f.action == "kill" && f.side == "target" {
		receiver.Wait()
		startReceiver(false) // the target agent comes back, with its journal
	}
	if strings.Contains(sendOut.String(), ": in-doubt") {
		// The source copies may live on the target: the source lock
		// stays (leased) for recover to remove once it has resolved.
		if tables, _ := r.src.Exec("nft", "list", "tables"); !bytes.Contains(tables, []byte("tcpmigrate_src-")) {
			t.Errorf("the source exited in doubt without its lock:\n%s", tables)
		}
	}
	if sendErr != nil {
		recoverAll(t, r.src, r.tls, filepath.Join(r.dir, "js"))
		if tables, _ := r.src.Exec("nft", "list", "tables"); bytes.Contains(tables, []byte("tcpmigrate")) {
			t.Errorf("a lock table is left on the source after recover:\n%s", tables)
		}
	}

	if f.want == "lost" {
		r.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := r.conn.Read(make([]byte, 1)); err == nil {
			t.Error("the connection the dead target had resumed is still alive at the peer")
		}
		r.watch.stop()
		return
	}
	if err := r.send(128 << 10); err != nil {
		t.Fatal(err)
	}
	if got := r.delivered(); got != f.want {
		t.Errorf("the connection ended on the %s, want the %s", got, f.want)
	}
	r.quiet()
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
