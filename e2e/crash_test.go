package e2e

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
)

// TestCLISourceKilledThenRecover kills the source agent (SIGKILL) at each
// step after it has frozen the workload, locked its connection and, from
// the capture on, put it in repair mode; `tcpmigrate recover` then gives
// the connection back: the workload (an unmodified socat) is thawed and
// carries on, every byte the peer sent arrives once, and nobody sees a
// reset.
func TestCLISourceKilledThenRecover(t *testing.T) {
	for _, step := range []string{"prepare", "capture", "verdicts", "switch"} {
		t.Run(step, func(t *testing.T) { testSourceKilled(t, step) })
	}
}

func testSourceKilled(t *testing.T, step string) {
	lan, peer, src, dst := lanHosts(t)
	cert, key, ca := certFiles(t)
	dir := t.TempDir()
	srcOut := filepath.Join(dir, "src.out")
	tls := []string{"--cert", cert, "--key", key, "--ca", ca}
	journal := filepath.Join(dir, "js")

	recv := append([]string{"receive", "--listen", "198.18.0.3:7946", "--claim-addr", svc.String(), "--dev", "eth0",
		"--journal-dir", filepath.Join(dir, "jt")}, tls...)
	recv = append(recv, "--exec", "--", "socat", "-u", "FD:3", "OPEN:"+filepath.Join(dir, "dst.out")+",creat,append")
	agent(t, dst, recv...)
	waitListening(t, dst, 7946)

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
	send := func(n int64) {
		buf := make([]byte, n)
		streamcheck.Pattern(buf, 0, off)
		off += n
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	send(128 << 10)
	waitFileSize(t, srcOut, off)

	marker := filepath.Join(dir, "hung")
	cmd := src.Command(bin, append([]string{"send", "--to", "198.18.0.3:7946", "--pid", strconv.Itoa(workload.Process.Pid),
		"--release-addr", svc.String(), "--dev", "eth0", "--lease", "30s", "--journal-dir", journal}, tls...)...)
	cmd.Env = append(os.Environ(), "TCPMIGRATE_TEST_HANG="+step, "TCPMIGRATE_TEST_HANG_FILE="+marker)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitFile(t, marker)
	// While the agent hangs, the peer keeps sending: these bytes wait in
	// the frozen (or locked) socket's queue.
	send(32 << 10)
	cmd.Process.Kill()
	cmd.Wait()
	t.Logf("send (killed at %s):\n%s", step, out.String())

	rec, err := src.Exec(bin, "recover", "--journal-dir", journal)
	t.Logf("recover:\n%s", rec)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(rec), "rolled back") {
		t.Fatalf("recover did not roll back")
	}
	// The workload runs again and gets everything, old and new.
	send(64 << 10)
	waitFileSize(t, srcOut, off)
	b, err := os.ReadFile(srcOut)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, off)
	streamcheck.Pattern(want, 0, 0)
	if !bytes.Equal(b, want) {
		t.Errorf("the workload's output is not the stream the peer sent")
	}
	if st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", workload.Process.Pid)); bytes.Contains(st, []byte(") T ")) {
		t.Error("the workload is still stopped")
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
