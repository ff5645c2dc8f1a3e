package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/tcpmigrate/tcpmigrate/internal/bench"
)

func benchCommand() *cli.Command {
	return &cli.Command{
		Name:  "bench",
		Usage: "migrate connections in a lab of network namespaces and report the performance figures (needs root)",
		UsageText: "tcpmigrate bench --conns N [--queue BYTES] [--stream [--stream-conns N] [--stream-interval D]] " +
			"[--calibrate N] [--no-hold] [--no-precopy] [--one-delivery] [--paused-handoff] [--profile DIR] [--pcap FILE] [--json] [--verbose]",
		Description: "Builds a peer, a source host and a target host in network namespaces, opens N connections from the\n" +
			"peer to a workload on the source, migrates them once with the two agents (each in a process of its own)\n" +
			"and prints the freeze, the phases, the peer stall, the per-connection costs beside the syscall floor,\n" +
			"the bytes moved and each agent's peak memory. docs/performance.md says how each figure is measured.",
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "conns", Value: 1000, Usage: "connections to migrate"},
			&cli.IntFlag{Name: "queue", Usage: "bytes queued each way on each connection that does not stream (0: idle)"},
			&cli.BoolFlag{Name: "stream", Usage: "some connections stream both ways through the move (see --stream-conns)"},
			&cli.IntFlag{Name: "stream-conns", Value: bench.DefaultStreamConns, Usage: "with --stream: how many connections stream (at most --conns)"},
			&cli.DurationFlag{Name: "stream-interval", Value: bench.DefaultStreamInterval, Usage: "with --stream: each stream writes 16 KiB this often, each way"},
			&cli.IntFlag{Name: "calibrate", Usage: "extra connections timed one by one for the per-connection costs (default 256)"},
			&cli.StringFlag{Name: "profile", Usage: "directory to write a CPU profile of each process into"},
			&cli.BoolFlag{Name: "no-precopy", Usage: "the source agent captures every connection inside the freeze, none before the lock (for a baseline)"},
			&cli.BoolFlag{Name: "one-delivery", Usage: "the target agent delivers every connection in one call once all are awake, not the busy ones first (for a baseline)"},
			&cli.BoolFlag{Name: "no-hold", Usage: "the source agent does not hold the peers with a zero window (drop-only lock, for a baseline)"},
			&cli.BoolFlag{Name: "paused-handoff", Usage: "the workload stops serving before it hands its sockets over, instead of serving them until the source agent pauses it (for a baseline)"},
			&cli.StringFlag{Name: "pcap", Usage: "file to record the migrated connections' segment headers on the bridge into, during the move"},
			&cli.BoolFlag{Name: "json", Usage: "print one JSON object"},
			&cli.BoolFlag{Name: "verbose", Usage: "progress and the children's logs on standard error"},
		},
		Subcommands: []*cli.Command{{
			Name:   "child",
			Hidden: true,
			Usage:  "a child of the benchmark (the peer or an agent); started by bench itself",
			Action: func(c *cli.Context) error { return bench.ChildMain(c.Context, os.Stdin, os.Stdout) },
		}},
		Action: runBench,
	}
}

func runBench(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected arguments %q", c.Args().Slice())}
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	o := bench.Options{Conns: c.Int("conns"), Queue: c.Int("queue"), StreamInterval: c.Duration("stream-interval"),
		Calibrate: c.Int("calibrate"), ProfileDir: c.String("profile"), Pcap: c.String("pcap"), NoHold: c.Bool("no-hold"), NoPrecopy: c.Bool("no-precopy"),
		PausedHandoff: c.Bool("paused-handoff"), OneDelivery: c.Bool("one-delivery"),
		Child: []string{exe, "bench", "child"}}
	if c.Bool("stream") {
		o.StreamConns = min(c.Int("stream-conns"), o.Conns)
	}
	if o.Conns < 1 || o.Queue < 0 || o.StreamConns < 0 || o.Calibrate < 0 {
		return usageError{fmt.Errorf("--conns must be at least 1; --queue, --stream-conns and --calibrate not negative")}
	}
	if c.Bool("verbose") {
		o.Log = os.Stderr
	}
	r, err := bench.Run(c.Context, o)
	if r != nil {
		if c.Bool("json") {
			enc := json.NewEncoder(os.Stdout)
			enc.SetIndent("", "  ")
			enc.Encode(r)
		} else {
			r.WriteTable(os.Stdout)
		}
	}
	if err != nil {
		return err
	}
	if bad := r.Consistent(); len(bad) > 0 {
		return fmt.Errorf("the run is not clean: %v", bad)
	}
	return nil
}
