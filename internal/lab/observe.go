package lab

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"
)

// TCPCounters returns the Tcp counters of /proc/net/snmp in the namespace
// (ActiveOpens, EstabResets, OutRsts, RetransSegs, ...).
func (n *NS) TCPCounters() (map[string]int64, error) {
	return n.counters("snmp", "Tcp:")
}

// TCPExtCounters returns the TcpExt counters of /proc/net/netstat in the
// namespace (TCPTimeouts, TCPLossProbes, TCPSynRetrans, TCPChallengeACK,
// ...).
func (n *NS) TCPExtCounters() (map[string]int64, error) {
	return n.counters("netstat", "TcpExt:")
}

// counters parses the pair of lines of /proc/net/file whose first field is
// prefix: the counters' names, then their values.
func (n *NS) counters(file, prefix string) (map[string]int64, error) {
	var b []byte
	err := n.Do(func() (err error) {
		b, err = os.ReadFile("/proc/thread-self/net/" + file)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("lab: read %s in %s: %w", file, n.Label, err)
	}
	var names []string
	m := map[string]int64{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != prefix {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i := 1; i < len(f) && i < len(names); i++ {
			m[names[i]], _ = strconv.ParseInt(f[i], 10, 64)
		}
	}
	if names == nil {
		return nil, fmt.Errorf("lab: no %s counters in %s of %s", prefix, file, n.Label)
	}
	return m, nil
}

// Resets sums the reset counters (EstabResets and OutRsts) of TCPCounters.
func (n *NS) Resets() (int64, error) {
	m, err := n.TCPCounters()
	if err != nil {
		return 0, err
	}
	return m["EstabResets"] + m["OutRsts"], nil
}

// Capture is a running tcpdump.
type Capture struct {
	cmd  *exec.Cmd
	file string
	done chan struct{} // closed when tcpdump's standard error is drained
}

// CaptureFlags starts tcpdump on the bridge of the switch namespace,
// keeping only TCP segments of port with RST or FIN set. file is where the
// capture is written.
func (l *LAN) CaptureFlags(port uint16, v6 bool, file string) (*Capture, error) {
	filter := fmt.Sprintf("tcp port %d and tcp[tcpflags] & (tcp-rst|tcp-fin) != 0", port)
	if v6 { // libpcap cannot index TCP over IPv6: the flags are at 40+13
		filter = fmt.Sprintf("ip6 and tcp port %d and ip6[53] & 5 != 0", port)
	}
	return l.StartCapture(filter, 0, file, nil)
}

// StartCapture starts tcpdump on the bridge of the switch namespace,
// writing the segments that filter (pcap-filter(7)) keeps into file, the
// first snaplen bytes of each (0: tcpdump's default, the whole segment).
// It returns once tcpdump listens. log, if not nil, receives each line
// tcpdump writes on its standard error (its start and its final counts).
func (l *LAN) StartCapture(filter string, snaplen int, file string, log func(string)) (*Capture, error) {
	args := []string{"-i", "br0", "--immediate-mode", "-U", "-n", "-w", file}
	if snaplen > 0 {
		args = append(args, "-s", strconv.Itoa(snaplen))
	}
	cmd := l.Switch.Command("tcpdump", append(args, filter)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("lab: tcpdump: %w", err)
	}
	if log == nil {
		log = func(string) {}
	}
	ready, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		started := false
		for sc.Scan() {
			if !started && strings.Contains(sc.Text(), "listening on") {
				close(ready)
				started = true
			}
			log(sc.Text())
		}
		io.Copy(io.Discard, stderr)
	}()
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("lab: tcpdump did not start")
	}
	return &Capture{cmd: cmd, file: file, done: done}, nil
}

// Close ends the capture, leaving its file for the caller.
func (c *Capture) Close() {
	time.Sleep(100 * time.Millisecond) // let the last packets reach the capture buffer
	c.cmd.Process.Signal(os.Interrupt)
	<-c.done
	c.cmd.Wait()
}

// Stop ends the capture and returns the segments it kept, one line each.
func (c *Capture) Stop() ([]string, error) {
	c.Close()
	out, err := exec.Command("tcpdump", "-n", "-r", c.file).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("lab: tcpdump -r: %w: %s", err, out)
	}
	lines := strings.Split(string(out), "\n")
	return slices.DeleteFunc(lines, func(l string) bool { return !strings.Contains(l, "Flags") }), nil
}
