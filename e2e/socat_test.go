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
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/internal/streamcheck"
)

// socatRun is the scene of the CLI tests: an unmodified socat on the source
// host that writes what it receives on the service address to a file, a
// peer connection streaming to it, and the watchers that judge the run
// (the peer's reset counters and a capture on the bridge). On the target,
// `receive --exec` hands migrated connections to a new socat writing to a
// second file; together the two files must be exactly what the peer sent.
type socatRun struct {
	t              *testing.T
	lan            *lab.LAN
	peer, src, dst *lab.NS
	service        netip.Prefix
	dir            string
	srcOut, dstOut string
	tls            []string // the TLS flags of both agents
	workload       *exec.Cmd
	conn           net.Conn
	off            int64 // bytes the peer has sent
	watch          *watch
}

// newSocatRun builds the lab with service on the source and starts socat
// listening with the given socat address (TCP-LISTEN:...), connected to
// by the peer. The capture starts once the connection is up.
func newSocatRun(t *testing.T, service netip.Prefix, listen string) *socatRun {
	t.Helper()
	r := &socatRun{t: t, service: service, dir: t.TempDir()}
	r.lan, r.peer, r.src, r.dst = lanHostsWith(t, service)
	cert, key, ca := certFiles(t)
	r.tls = []string{"--cert", cert, "--key", key, "--ca", ca}
	r.srcOut, r.dstOut = filepath.Join(r.dir, "src.out"), filepath.Join(r.dir, "dst.out")
	r.workload = r.src.Command("socat", "-u", listen, "OPEN:"+r.srcOut+",creat,append")
	if err := r.workload.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.workload.Process.Kill(); r.workload.Wait() })
	waitListening(t, r.src, svcPort)
	if err := r.peer.Do(func() (err error) {
		r.conn, err = net.Dial("tcp", netip.AddrPortFrom(service.Addr(), svcPort).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.conn.Close() })
	r.watch = startWatch(t, r.lan, r.peer, service.Addr().Is6())
	return r
}

// socatListen is the listening address of an IPv4 socat on the service.
func socatListen(p netip.Prefix) string {
	return fmt.Sprintf("TCP-LISTEN:%d,bind=%s,reuseaddr", svcPort, p.Addr())
}

// receiveArgs returns the arguments of `tcpmigrate receive` on the target
// that claims the service and execs the second socat, plus extra flags.
func (r *socatRun) receiveArgs(extra ...string) []string {
	args := append([]string{"receive", "--listen", "198.18.0.3:7946", "--claim-addr", r.service.String(), "--dev", "eth0",
		"--journal-dir", filepath.Join(r.dir, "jt")}, r.tls...)
	args = append(args, extra...)
	return append(args, "--exec", "--", "socat", "-u", "FD:3", "OPEN:"+r.dstOut+",creat,append")
}

// sendArgs returns the arguments of `tcpmigrate send --pid` for the
// workload, releasing the service at the switch, plus extra flags.
func (r *socatRun) sendArgs(extra ...string) []string {
	args := append([]string{"send", "--to", "198.18.0.3:7946", "--pid", strconv.Itoa(r.workload.Process.Pid),
		"--release-addr", r.service.String(), "--dev", "eth0", "--journal-dir", filepath.Join(r.dir, "js")}, r.tls...)
	return append(args, extra...)
}

// send streams the next n bytes of the peer's stream.
func (r *socatRun) send(n int64) error {
	buf := make([]byte, n)
	streamcheck.Pattern(buf, 0, r.off)
	r.off += n
	r.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := r.conn.Write(buf)
	return err
}

// delivered waits until the two files together hold everything sent, checks
// that they are the stream, and says which host holds the connection now
// ("source" or "target", by whether the target's socat wrote anything).
func (r *socatRun) delivered() string {
	t := r.t
	t.Helper()
	lab.WaitForWithin(t, 20*time.Second, fmt.Sprintf("the %d bytes sent", r.off), func() (bool, string) {
		src, dst := size(r.srcOut), size(r.dstOut)
		return src+dst >= r.off, fmt.Sprintf("%d+%d bytes arrived", src, dst)
	})
	want := make([]byte, r.off)
	streamcheck.Pattern(want, 0, 0)
	if !bytes.Equal(append(read(r.srcOut), read(r.dstOut)...), want) {
		t.Errorf("the two hosts' output is not the stream the peer sent (%d+%d bytes)", size(r.srcOut), size(r.dstOut))
	}
	if size(r.dstOut) > 0 {
		return "target"
	}
	return "source"
}

// quiet checks that the peer counted no reset, that the capture saw no RST
// and no FIN, and that no lock table is left on the source.
func (r *socatRun) quiet() {
	t := r.t
	t.Helper()
	if out, _ := r.src.Exec("nft", "list", "tables"); bytes.Contains(out, []byte("tcpmigrate")) {
		t.Errorf("a lock table is left on the source:\n%s", out)
	}
	r.watch.quiet(t)
}

func waitFileSize(t *testing.T, path string, n int64) {
	t.Helper()
	lab.WaitForWithin(t, 20*time.Second, fmt.Sprintf("%s to reach %d bytes", path, n), func() (bool, string) {
		got := size(path)
		return got >= n, fmt.Sprintf("%d bytes", got)
	})
	if size(path) > n {
		t.Fatalf("%s has %d bytes, more than the %d sent", path, size(path), n)
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
