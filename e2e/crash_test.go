package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCLISourceKilledThenRecover kills the source agent (SIGKILL) at each
// step after it has frozen the workload, locked its connection and, from
// the capture on, put it in repair mode; `tcpmigrate recover` then gives
// the connection back: the workload (an unmodified socat) is thawed and
// carries on, every byte the peer sent arrives once, and nobody sees a
// reset. (TestCLIFaultMatrix covers every step of both agents, killed or
// cut off; this test checks recover without the TLS flags, which a source
// that never sent Commit does not need.)
func TestCLISourceKilledThenRecover(t *testing.T) {
	for _, step := range []string{"prepare", "capture", "verdicts"} {
		t.Run(step, func(t *testing.T) { testSourceKilled(t, step) })
	}
}

func testSourceKilled(t *testing.T, step string) {
	r := newSocatRun(t, svc, socatListen(svc))
	agent(t, r.dst, r.receiveArgs()...)
	waitListening(t, r.dst, 7946)
	if err := r.send(128 << 10); err != nil {
		t.Fatal(err)
	}
	waitFileSize(t, r.srcOut, r.off)

	marker := filepath.Join(r.dir, "hung")
	cmd := r.src.Command(bin, r.sendArgs("--lease", "30s")...)
	cmd.Env = append(os.Environ(), "TCPMIGRATE_TEST_HANG="+step, "TCPMIGRATE_TEST_HANG_FILE="+marker)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitFile(t, marker)
	// While the agent hangs, the peer keeps sending: these bytes wait in
	// the frozen (or locked) socket's queue.
	if err := r.send(32 << 10); err != nil {
		t.Fatal(err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	t.Logf("send (killed at %s):\n%s", step, out.String())

	rec, err := r.src.Exec(bin, "recover", "--journal-dir", filepath.Join(r.dir, "js"))
	t.Logf("recover:\n%s", rec)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(rec), "rolled back") {
		t.Fatalf("recover did not roll back")
	}
	if st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", r.workload.Process.Pid)); bytes.Contains(st, []byte(") T ")) {
		t.Error("the workload is still stopped")
	}
	// The workload runs again and gets everything, old and new.
	if err := r.send(64 << 10); err != nil {
		t.Fatal(err)
	}
	if got := r.delivered(); got != "source" {
		t.Errorf("the connection is on the %s", got)
	}
	r.quiet()
}
