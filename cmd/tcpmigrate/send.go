package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tcpmigrate/tcpmigrate/internal/addrmove"
	"github.com/tcpmigrate/tcpmigrate/internal/freeze"
	"github.com/tcpmigrate/tcpmigrate/internal/journal"
	"github.com/tcpmigrate/tcpmigrate/internal/procsock"
	"github.com/tcpmigrate/tcpmigrate/source"
)

func sendCommand() *cli.Command {
	return &cli.Command{
		Name:      "send",
		Usage:     "migrate connections from this host to a target agent",
		UsageText: "tcpmigrate send --to HOST:PORT (--cert F --key F --ca F | --insecure) (--pid PID [--port N]... | --handoff unix:PATH) [options]",
		Flags: append(append([]cli.Flag{
			&cli.StringFlag{Name: "to", Usage: "the target agent, HOST:PORT"},
			&cli.IntFlag{Name: "pid", Usage: "take the established TCP connections and the listeners of this process"},
			&cli.UintSliceFlag{Name: "port", Usage: "with --pid: only connections and listeners on these local ports"},
			&cli.StringFlag{Name: "handoff", Usage: "unix:PATH where a cooperating program hands its sockets over (live: it serves them until paused before the lock; docs/handoff-socket.md)"},
			&cli.BoolFlag{Name: "pause-waves", Usage: "with a live --handoff: the program answers more than one PAUSE, so the quiet connections are paused and copied first and the busy ones paused last (docs/handoff-socket.md)"},
			&cli.StringFlag{Name: "release-addr", Usage: "service address (CIDR) to release at the switch"},
			&cli.StringFlag{Name: "dev", Usage: "interface of --release-addr"},
			&cli.StringFlag{Name: "on-switch", Usage: "command (sh -c) that moves the network identity at the switch; non-zero exit aborts"},
			&cli.StringFlag{Name: "on-abort", Usage: "command (sh -c) that gives the identity back if the migration aborts after --on-switch"},
			&cli.StringFlag{Name: "after", Value: "kill", Usage: "with --pid, what happens to the process once its connections are committed: kill, stop or keep"},
			&cli.DurationFlag{Name: "lease", Value: source.DefaultLease, Usage: "how long locks outlive a silent agent"},
			&cli.DurationFlag{Name: "timeout", Value: source.DefaultTimeout, Usage: "how long to wait for each answer of the target"},
			&cli.BoolFlag{Name: "no-precopy", Usage: "capture every connection after the lock, inside the freeze (by default a held connection is copied before the lock and only confirmed, or captured again if it moved, after it)"},
			&cli.BoolFlag{Name: "no-hold", Usage: "do not hold the peers with a zero window before the lock (drop only: a peer that sends during the freeze waits for its retransmission timer)"},
			&cli.BoolFlag{Name: "json", Usage: "print one JSON object describing the migration"},
		}, tlsFlags...), logFlags...),
		Action: runSend,
	}
}

func runSend(c *cli.Context) error {
	if err := require(c, "to"); err != nil {
		return err
	}
	if (c.Int("pid") == 0) == (c.String("handoff") == "") {
		return usageError{errors.New("give exactly one of --pid and --handoff")}
	}
	after := c.String("after")
	if after != "kill" && after != "stop" && after != "keep" {
		return usageError{fmt.Errorf("--after must be kill, stop or keep, not %q", after)}
	}
	tcfg, err := transportConfig(c)
	if err != nil {
		return err
	}
	requireTarget(tcfg)
	log, err := logger(c)
	if err != nil {
		return err
	}
	cfg := source.Config{
		To: c.String("to"), Transport: tcfg, Lease: c.Duration("lease"), Timeout: c.Duration("timeout"),
		JournalDir: c.String("journal-dir"), Log: log, Fault: testHang[source.Step](), NoHold: c.Bool("no-hold"), NoPrecopy: c.Bool("no-precopy"),
	}
	if err := switchHooks(c, &cfg); err != nil {
		return err
	}
	if !c.Bool("json") && isTerminal(os.Stderr) {
		cfg.Progress = progressBar(os.Stderr)
	}
	ctx := c.Context
	var res *source.Result
	var merr error
	if pid := c.Int("pid"); pid != 0 {
		res, merr = sendPID(ctx, c, cfg, pid, after)
	} else {
		res, merr = sendHandoff(ctx, c, cfg)
	}
	if res != nil {
		if c.Bool("json") {
			printJSON(res)
		} else {
			printSummary(res, merr)
		}
	}
	if merr != nil && res == nil {
		return merr
	}
	if res == nil || !res.Committed() {
		return cli.Exit("", 1)
	}
	return nil
}

// switchHooks turns --release-addr or --on-switch into the switch of cfg.
func switchHooks(c *cli.Context, cfg *source.Config) error {
	if c.String("release-addr") != "" && c.String("on-switch") != "" {
		return usageError{errors.New("--release-addr and --on-switch exclude each other")}
	}
	if am, ok, err := addrFlag(c, "release-addr"); err != nil {
		return err
	} else if ok {
		cfg.Switch = func(ctx context.Context) error { return addrmove.Release(ctx, am) }
		cfg.Unswitch = func(ctx context.Context) error { return addrmove.Claim(ctx, am) }
		cfg.SwitchAddrs = []netip.Prefix{am.Prefix}
	}
	if cmd := c.String("on-switch"); cmd != "" {
		cfg.Switch = func(ctx context.Context) error { return runHook(ctx, cmd, "switch") }
		if undo := c.String("on-abort"); undo != "" {
			cfg.Unswitch = func(ctx context.Context) error { return runHook(ctx, undo, "abort") }
		}
	}
	return nil
}

// runHook runs an operator's command with sh -c; TCPMIGRATE_PHASE says why.
func runHook(ctx context.Context, command, phase string) error {
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", command)
	cmd.Env = append(os.Environ(), "TCPMIGRATE_PHASE="+phase)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("hook %q (%s): %w", command, phase, err)
	}
	return nil
}

// sendPID migrates the established connections of a process: freeze it,
// take copies of its sockets, migrate, then kill, stop or thaw it.
func sendPID(ctx context.Context, c *cli.Context, cfg source.Config, pid int, after string) (*source.Result, error) {
	ports, err := portsFlag(c, "port")
	if err != nil {
		return nil, err
	}
	socks, err := procsock.List(pid)
	if err != nil {
		return nil, err
	}
	socks, unused := procsock.Filter(socks, ports)
	listeners, unused := pidListeners(socks, ports, unused)
	if len(unused) > 0 {
		return nil, usageError{fmt.Errorf("--port %v: no established connection or listener of process %d", unused, pid)}
	}
	taken := procsock.Taken(socks)
	if len(taken) == 0 && len(listeners) == 0 {
		return nil, fmt.Errorf("process %d has no connection to migrate (see tcpmigrate list --pid %d)", pid, pid)
	}
	ns, err := procsock.NetNS(pid)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	cfg.NetNS = int(ns)
	fz, err := freeze.Freeze(pid)
	if err != nil {
		return nil, err
	}
	files, err := procsock.DupSockets(pid, taken)
	if err != nil {
		return nil, errors.Join(err, fz.Thaw())
	}
	if cfg.Listeners, err = dupListeners(pid, listeners); err != nil {
		for _, f := range files {
			f.Close()
		}
		return nil, errors.Join(err, fz.Thaw())
	}
	conns := make([]source.Conn, len(files))
	for i, f := range files {
		conns[i] = source.Conn{File: f, OwnerFD: taken[i].FD()}
	}
	rec := fz.Record()
	cfg.Annotate = func(r *journal.Record) {
		r.PID, r.Freeze, r.NetNS, r.Dev = pid, &rec, fmt.Sprintf("/proc/%d/ns/net", pid), c.String("dev")
	}
	if after == "kill" {
		// The process's own descriptors must be gone before the lock is.
		cfg.BeforeRelease = fz.Kill
	}
	res, err := source.Migrate(ctx, cfg, conns)
	for _, l := range cfg.Listeners {
		l.File.Close() // the process has its own; closing twice is harmless
	}
	switch {
	case errors.Is(err, source.ErrInDoubt):
		// Leave the process frozen: recover decides.
	case res != nil && res.Committed():
		if after == "keep" {
			err = errors.Join(err, fz.Thaw())
		}
	default:
		// Something stayed here: the process carries on with it.
		err = errors.Join(err, fz.Thaw())
	}
	return res, err
}

// connJSON is one connection in the --json report.
type connJSON struct {
	Local    string `json:"local"`
	Remote   string `json:"remote"`
	Outcome  string `json:"outcome"`
	FreezeUS int64  `json:"freeze_us"`
	Error    string `json:"error,omitempty"`
	// PendingOn is the listener whose accept queue the connection was taken from.
	PendingOn string `json:"pending_on,omitempty"`
}

// listenerJSON is one listener in the --json report.
type listenerJSON struct {
	Local   string `json:"local"`
	Pending int    `json:"pending"`
	Outcome string `json:"outcome"`
	Error   string `json:"error,omitempty"`
}

func printJSON(r *source.Result) {
	out := struct {
		MigrationID string           `json:"migration_id"`
		State       string           `json:"state"`
		Connections []connJSON       `json:"connections"`
		Listeners   []listenerJSON   `json:"listeners,omitempty"`
		Phases      map[string]int64 `json:"phases"`
		Bytes       map[string]int64 `json:"bytes"`
	}{MigrationID: r.Migration.String(), State: r.State.String(), Phases: map[string]int64{},
		Bytes: map[string]int64{"raw": r.RawBytes, "wire": r.WireBytes}}
	for _, cr := range r.Conns {
		j := connJSON{Local: cr.Local.String(), Remote: cr.Remote.String(), Outcome: string(cr.Outcome), FreezeUS: cr.Freeze.Microseconds()}
		if cr.Err != nil {
			j.Error = cr.Err.Error()
		}
		if cr.PendingOn.IsValid() {
			j.PendingOn = cr.PendingOn.String()
		}
		out.Connections = append(out.Connections, j)
	}
	for _, lr := range r.Listeners {
		j := listenerJSON{Local: lr.Local.String(), Pending: lr.Pending, Outcome: string(lr.Outcome)}
		if lr.Err != nil {
			j.Error = lr.Err.Error()
		}
		out.Listeners = append(out.Listeners, j)
	}
	for _, p := range r.Phases {
		out.Phases[p.Name] = p.Duration.Microseconds()
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	enc.Encode(out)
}

func printSummary(r *source.Result, err error) {
	n := map[source.Outcome]int{}
	var maxFreeze time.Duration
	for _, cr := range r.Conns {
		n[cr.Outcome]++
		maxFreeze = max(maxFreeze, cr.Freeze)
	}
	var phases []string
	for _, p := range r.Phases {
		phases = append(phases, fmt.Sprintf("%s %s", p.Name, p.Duration.Round(time.Microsecond)))
	}
	fmt.Printf("migration %s: %s\n", r.Migration, r.State)
	fmt.Printf("  %d committed, %d rolled back, %d failed; longest freeze %s\n",
		n[source.Committed], n[source.RolledBack], n[source.Failed], maxFreeze.Round(time.Microsecond))
	fmt.Printf("  phases: %s\n", strings.Join(phases, ", "))
	fmt.Printf("  bytes: %d of connection state, %d on the wire\n", r.RawBytes, r.WireBytes)
	for _, cr := range r.Conns {
		if cr.Err != nil {
			fmt.Printf("  %s -> %s: %s: %v\n", cr.Local, cr.Remote, cr.Outcome, cr.Err)
		}
	}
	for _, lr := range r.Listeners {
		fmt.Printf("  listener %s (%d pending taken): %s", lr.Local, lr.Pending, lr.Outcome)
		if lr.Err != nil {
			fmt.Printf(": %v", lr.Err)
		}
		fmt.Println()
	}
	if err != nil {
		fmt.Printf("  error: %v\n", err)
	}
}
