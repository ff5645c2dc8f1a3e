package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime/pprof"
	"strings"
	"sync"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// The roles a child plays.
const (
	rolePeer   = "peer"
	roleSource = "source"
	roleTarget = "target"
)

// childConfig is the first line a child reads on its standard input.
type childConfig struct {
	Role string `json:"role"`
	// CPUProfile, if set, is where the child writes its CPU profile.
	CPUProfile string        `json:"cpu_profile,omitempty"`
	TLS        tlsFiles      `json:"tls"`
	Peer       *peerConfig   `json:"peer,omitempty"`
	Source     *sourceConfig `json:"source,omitempty"`
	Target     *targetConfig `json:"target,omitempty"`
}

// tlsFiles name the PEM files of an agent's link.
type tlsFiles struct {
	Cert string `json:"cert"`
	Key  string `json:"key"`
	CA   string `json:"ca"`
}

// event is the envelope of every line a child writes on its standard
// output; the payload's fields sit beside Event.
type event struct {
	Event string `json:"event"`
	Error string `json:"error,omitempty"`
}

// ChildMain runs one child of a benchmark (the peer, the source agent or the
// target agent) as the first JSON line of in says, answering on out, one
// JSON object a line, and logging to standard error. Run starts its
// children with Options.Child; a program offers ChildMain behind a hidden
// command or an environment variable, and must not print anything else on
// standard output.
func ChildMain(ctx context.Context, in io.Reader, out io.Writer) error {
	dec := json.NewDecoder(bufio.NewReader(in))
	enc := json.NewEncoder(out)
	var cfg childConfig
	if err := dec.Decode(&cfg); err != nil {
		return fmt.Errorf("bench: child configuration: %w", err)
	}
	if cfg.CPUProfile != "" {
		f, err := os.Create(cfg.CPUProfile)
		if err != nil {
			return fmt.Errorf("bench: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			return fmt.Errorf("bench: cpu profile: %w", err)
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	var err error
	switch {
	case cfg.Role == rolePeer && cfg.Peer != nil:
		err = runPeer(ctx, cfg.Peer, dec, enc)
	case cfg.Role == roleSource && cfg.Source != nil:
		err = runSource(ctx, &cfg, enc)
	case cfg.Role == roleTarget && cfg.Target != nil:
		err = runTarget(ctx, &cfg, enc)
	default:
		err = fmt.Errorf("bench: unknown child role %q", cfg.Role)
	}
	if err != nil {
		enc.Encode(event{Event: "failed", Error: err.Error()})
	}
	return err
}

// linkConfig builds an agent's link configuration from its PEM files, as
// the CLI does for --cert, --key and --ca.
func linkConfig(f tlsFiles) (*transport.Config, error) {
	cfg, err := transport.LoadConfig(f.Cert, f.Key, f.CA)
	if err != nil {
		return nil, err
	}
	caps, err := repair.Probe()
	if err != nil {
		return nil, err
	}
	cfg.Capabilities = caps
	cfg.Require = repair.FeatRepair | repair.FeatRepairWindow
	cfg.Software = "tcpmigrate-bench"
	return cfg, nil
}

func childLog() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// child is a running child process as the bench process sees it.
type child struct {
	role   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	enc    *json.Encoder
	lines  chan []byte // stdout, one JSON object each
	exited chan struct{}
	err    error // the exit status, once exited is closed
	log    *tailWriter
}

// startChild starts a child inside ns and sends it its configuration.
func startChild(o *Options, ns *lab.NS, cfg childConfig) (*child, error) {
	args := append([]string{"netns", "exec", ns.Name}, o.Child...)
	cmd := exec.Command("ip", args...)
	cmd.Env = append(os.Environ(), o.ChildEnv...)
	c := &child{role: cfg.Role, cmd: cmd, lines: make(chan []byte, 16), exited: make(chan struct{}),
		log: &tailWriter{prefix: cfg.Role + ": ", to: o.Log}}
	cmd.Stderr = c.log
	var err error
	if c.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("bench: start the %s child: %w", cfg.Role, err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 256<<20)
		for sc.Scan() {
			c.lines <- append([]byte(nil), sc.Bytes()...)
		}
		close(c.lines)
		c.err = cmd.Wait()
		close(c.exited)
	}()
	c.enc = json.NewEncoder(c.stdin)
	if err := c.send(cfg); err != nil {
		c.kill()
		return nil, err
	}
	return c, nil
}

func (c *child) send(v any) error {
	if err := c.enc.Encode(v); err != nil {
		return fmt.Errorf("bench: write to the %s child: %w", c.role, err)
	}
	return nil
}

// recv waits for the next line of the child, which must be the event want,
// and decodes it into v.
func (c *child) recv(ctx context.Context, want string, timeout time.Duration, v any) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case line, ok := <-c.lines:
		if !ok {
			<-c.exited
			return fmt.Errorf("bench: the %s child exited (%v) before %q: %s", c.role, c.err, want, c.log.tail())
		}
		var e event
		if err := json.Unmarshal(line, &e); err != nil {
			return fmt.Errorf("bench: %s child: %w: %.200s", c.role, err, line)
		}
		if e.Event != want {
			return fmt.Errorf("bench: %s child: %s instead of %s: %s", c.role, e.Event, want, e.Error)
		}
		if v != nil {
			if err := json.Unmarshal(line, v); err != nil {
				return fmt.Errorf("bench: %s child %s: %w", c.role, want, err)
			}
		}
		return nil
	case <-t.C:
		return fmt.Errorf("bench: no %q from the %s child within %s: %s", want, c.role, timeout, c.log.tail())
	case <-ctx.Done():
		return ctx.Err()
	}
}

// finish closes the child's input and waits for it to exit, killing it
// after timeout.
func (c *child) finish(timeout time.Duration) error {
	c.stdin.Close()
	select {
	case <-c.exited:
	case <-time.After(timeout):
		c.kill()
		return fmt.Errorf("bench: the %s child did not exit within %s", c.role, timeout)
	}
	if c.err != nil {
		return fmt.Errorf("bench: the %s child: %w: %s", c.role, c.err, c.log.tail())
	}
	return nil
}

// kill ends the child (the process this bench started, by its PID) and
// waits for it.
func (c *child) kill() {
	c.stdin.Close()
	select {
	case <-c.exited:
		return
	default:
	}
	c.cmd.Process.Kill()
	go func() {
		for range c.lines {
		}
	}()
	<-c.exited
}

// tailWriter copies a child's log lines, prefixed, to a writer (if any)
// and keeps the last few kilobytes for error messages.
type tailWriter struct {
	prefix string
	to     io.Writer

	mu   sync.Mutex // guards buf and part
	buf  []byte
	part []byte
}

func (w *tailWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	if len(w.buf) > 4<<10 {
		w.buf = w.buf[len(w.buf)-4<<10:]
	}
	if w.to != nil {
		w.part = append(w.part, p...)
		for {
			i := strings.IndexByte(string(w.part), '\n')
			if i < 0 {
				break
			}
			fmt.Fprintf(w.to, "%s%s\n", w.prefix, w.part[:i])
			w.part = w.part[i+1:]
		}
	}
	return len(p), nil
}

func (w *tailWriter) tail() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return strings.TrimSpace(string(w.buf))
}

// errList collects errors from several goroutines.
type errList struct {
	mu   sync.Mutex // guards errs
	errs []error
}

func (l *errList) add(err error) {
	if err == nil {
		return
	}
	l.mu.Lock()
	l.errs = append(l.errs, err)
	l.mu.Unlock()
}

func (l *errList) err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return errors.Join(l.errs...)
}
