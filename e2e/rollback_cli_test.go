package e2e

import (
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/fdpass"
)

// TestCLIHandBack has the target refuse every connection (its allow-list
// does not hold the service address): `send --handoff` hands the live
// sockets back to the workload, which carries on streaming on them; the
// peers verify every byte and see no reset.
func TestCLIHandBack(t *testing.T) {
	w := newWorld(t, 4)
	cert, key, ca := certFiles(t)
	dir := t.TempDir()
	hand := filepath.Join(dir, "handoff.sock")
	tls := []string{"--cert", cert, "--key", key, "--ca", ca}
	agent(t, w.dst, append([]string{"receive", "--listen", "198.18.0.3:7946", "--allow", "198.19.0.0/16", "--once",
		"--journal-dir", filepath.Join(dir, "jt"), "--deliver", "unix:" + filepath.Join(dir, "unused.sock")}, tls...)...)
	waitListening(t, w.dst, 7946)
	sender := agent(t, w.src, append([]string{"send", "--to", "198.18.0.3:7946", "--handoff", "unix:" + hand,
		"--journal-dir", filepath.Join(dir, "js")}, tls...)...)
	waitFile(t, hand)

	hc := w.handOff(hand)
	defer hc.Close()
	m, err := hc.Receive()
	if err != nil {
		t.Fatal(err)
	}
	if m.Kind != fdpass.KindHandBack || len(m.Items) != len(w.conns) {
		t.Fatalf("the source answered %s with %d sockets, want all %d handed back", m.Kind, len(m.Items), len(w.conns))
	}
	// The workload carries on, on the sockets it got back.
	for _, it := range m.Items {
		c, err := net.FileConn(it.File)
		it.File.Close()
		if err != nil {
			t.Fatal(err)
		}
		w.endpoint(it.Remote).Start(c.(*net.TCPConn))
	}
	for _, c := range w.conns {
		c.Close() // the workload's old descriptors; the sockets live on in the ones handed back
	}
	if err := sender.Wait(); err == nil {
		t.Error("send exited 0 although nothing was committed")
	}
	w.check(500 * time.Millisecond)
}

// TestCLIOnSwitchFails: a switch hook that fails aborts the migration; the
// connection stays on the source, intact, and the peer sees no reset.
func TestCLIOnSwitchFails(t *testing.T) {
	r := newSocatRun(t, svc, socatListen(svc))
	agent(t, r.dst, r.receiveArgs()...)
	waitListening(t, r.dst, 7946)
	if err := r.send(64 << 10); err != nil {
		t.Fatal(err)
	}
	waitFileSize(t, r.srcOut, r.off)
	args := []string{"send", "--to", "198.18.0.3:7946", "--pid", strconv.Itoa(r.workload.Process.Pid), "--on-switch", "exit 3",
		"--json", "--journal-dir", filepath.Join(r.dir, "js")}
	out, err := r.src.Command(bin, append(args, r.tls...)...).Output()
	t.Logf("send: %v\n%s", err, out)
	if err == nil || !strings.Contains(string(out), `"outcome": "rolled_back"`) {
		t.Fatal("a failed switch hook did not roll the migration back")
	}
	if err := r.send(64 << 10); err != nil {
		t.Fatal(err)
	}
	if got := r.delivered(); got != "source" {
		t.Errorf("the connection is on the %s", got)
	}
	r.quiet()
}
