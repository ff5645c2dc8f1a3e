package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/tcpmigrate/tcpmigrate/internal/activation"
	"github.com/tcpmigrate/tcpmigrate/internal/addrmove"
	"github.com/tcpmigrate/tcpmigrate/internal/audit"
	"github.com/tcpmigrate/tcpmigrate/internal/fdpass"
	"github.com/tcpmigrate/tcpmigrate/target"
)

func receiveCommand() *cli.Command {
	return &cli.Command{
		Name:  "receive",
		Usage: "accept migrations from source agents and deliver the connections",
		UsageText: "tcpmigrate receive --listen HOST:PORT (--cert F --key F --ca F | --insecure) [--allow CIDR]... " +
			"[--allow-port N]... [--claim-addr CIDR --dev IFACE] [--max-conns N] [--max-queue-bytes N] [--max-bytes N] " +
			"[--audit-log FILE] [--once] (--exec -- CMD [ARG...] | --deliver unix:PATH [--deliver-waves])",
		Flags: append(append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Usage: "address to accept source agents on, HOST:PORT"},
			&cli.StringSliceFlag{Name: "allow", Usage: "local addresses (CIDR) connections may be restored for"},
			&cli.UintSliceFlag{Name: "allow-port", Usage: "local port connections may be restored for (repeatable; default: any)"},
			&cli.Uint64Flag{Name: "max-conns", Value: target.DefaultMaxConnections, Usage: "most connections in one migration; a larger one is refused whole"},
			&cli.Uint64Flag{Name: "max-queue-bytes", Value: target.DefaultMaxQueueBytes, Usage: "most bytes of queues and state of one connection"},
			&cli.Uint64Flag{Name: "max-bytes", Value: target.DefaultMaxBytes, Usage: "most bytes of queues and state of one migration"},
			&cli.DurationFlag{Name: "prepare-timeout", Value: target.DefaultPrepareTimeout, Usage: "longest a source may take to send its snapshots"},
			&cli.DurationFlag{Name: "commit-timeout", Value: target.DefaultCommitTimeout, Usage: "longest a source may take from prepared to commit (the switch included)"},
			&cli.StringFlag{Name: "audit-log", Usage: "append one JSON line per migration, query and refused handshake to FILE (mode 0600)"},
			&cli.StringFlag{Name: "claim-addr", Usage: "service address (CIDR) to claim at the switch; also allowed"},
			&cli.StringFlag{Name: "dev", Usage: "interface of --claim-addr"},
			&cli.BoolFlag{Name: "once", Usage: "exit after one migration: 0 if it committed"},
			&cli.BoolFlag{Name: "exec", Usage: "start the command after -- with the sockets as fds 3, 4, ... (systemd socket activation)"},
			&cli.StringFlag{Name: "deliver", Usage: "unix:PATH of a running program to pass the sockets to"},
			&cli.BoolFlag{Name: "deliver-waves", Usage: "with --deliver: pass the connections whose peers were busy first, in a delivery of their own, while the others are still being woken"},
		}, tlsFlags...), logFlags...),
		Action: runReceive,
	}
}

func runReceive(c *cli.Context) error {
	if err := require(c, "listen"); err != nil {
		return err
	}
	execArgs := c.Args().Slice()
	if c.Bool("exec") == (c.String("deliver") != "") {
		return usageError{errors.New("give exactly one of --exec -- CMD and --deliver unix:PATH")}
	}
	if c.Bool("exec") && len(execArgs) == 0 {
		return usageError{errors.New("--exec needs a command after --")}
	}
	if c.Bool("exec") && c.Bool("deliver-waves") {
		// A second delivery would start a second program.
		return usageError{errors.New("--deliver-waves needs --deliver unix:PATH, not --exec")}
	}
	tcfg, err := transportConfig(c)
	if err != nil {
		return err
	}
	log, err := logger(c)
	if err != nil {
		return err
	}
	cfg := target.Config{Transport: tcfg, JournalDir: c.String("journal-dir"), Log: log, Fault: testHang[target.Step]()}
	if cfg.Policy, err = receivePolicy(c); err != nil {
		return err
	}
	for _, s := range c.StringSlice("allow") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return usageError{fmt.Errorf("--allow: %w", err)}
		}
		cfg.Allow = append(cfg.Allow, p)
	}
	if am, ok, err := addrFlag(c, "claim-addr"); err != nil {
		return err
	} else if ok {
		a := am.Prefix.Addr()
		cfg.Allow = append(cfg.Allow, netip.PrefixFrom(a, a.BitLen()))
		cfg.Claim = func(ctx context.Context, _ []netip.Prefix) error { return addrmove.Claim(ctx, am) }
		cfg.Unclaim = func(ctx context.Context, _ []netip.Prefix) error { return addrmove.Release(ctx, am) }
	}
	if len(cfg.Allow) == 0 {
		return usageError{errors.New("give --allow or --claim-addr: the target restores nothing by default")}
	}
	if c.Bool("exec") {
		cfg.Deliver = execDeliver(execArgs)
	} else {
		path, err := unixFlag(c, "deliver")
		if err != nil {
			return err
		}
		cfg.Deliver = socketDeliver(path, log)
		cfg.DeliverWaves = c.Bool("deliver-waves")
	}
	if path := c.String("audit-log"); path != "" {
		if cfg.Audit, err = audit.Open(path); err != nil {
			return err
		}
		defer cfg.Audit.Close()
	}
	srv, err := target.NewServer(cfg)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", c.String("listen"))
	if err != nil {
		return err
	}
	defer ln.Close()
	log.Info("listening", "addr", ln.Addr().String())
	if !c.Bool("once") {
		return srv.ServeListener(c.Context, ln)
	}
	for {
		conn, err := ln.Accept()
		if err != nil {
			return err
		}
		link, err := srv.Handshake(c.Context, conn)
		if err != nil {
			log.Warn("handshake refused", "err", err)
			continue
		}
		rep, err := srv.ServeLink(c.Context, link)
		if rep != nil && rep.Query {
			continue
		}
		if rep != nil {
			fmt.Printf("migration %s: %s, %d connections\n", rep.Migration, rep.State, len(rep.Conns))
		}
		if err != nil {
			return err
		}
		if rep == nil || rep.State != target.StateCommitted {
			return cli.Exit("", 1)
		}
		return nil
	}
}

// execDeliver starts the command with each migration's sockets inherited
// the systemd way. The program outlives the agent.
func execDeliver(args []string) func(context.Context, []*target.Delivered) map[uint32]error {
	return func(_ context.Context, conns []*target.Delivered) map[uint32]error {
		files := make([]*os.File, len(conns))
		names := make([]string, len(conns))
		var err error
		for i, d := range conns {
			files[i] = d.File
			if names[i], err = deliveredName(d); err != nil {
				break
			}
		}
		var cmd *exec.Cmd
		if err == nil {
			// Not bound to a context: the program outlives the agent.
			cmd, err = activation.Command(context.Background(), args[0], args[1:], files, names)
		}
		if err == nil {
			cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
			cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
			err = cmd.Start()
		}
		for _, f := range files {
			f.Close() // the child has its own copies (or the start failed)
		}
		if err != nil {
			return failAll(conns, fmt.Errorf("start %s: %w", args[0], err))
		}
		go cmd.Wait()
		return nil
	}
}

// socketDeliver passes each migration's sockets to the program listening
// on the unix socket at path, with their metadata.
func socketDeliver(path string, log *slog.Logger) func(context.Context, []*target.Delivered) map[uint32]error {
	return func(ctx context.Context, conns []*target.Delivered) map[uint32]error {
		items := make([]fdpass.Item, len(conns))
		for i, d := range conns {
			items[i] = fdpass.Item{File: d.File, Local: d.Local, Remote: d.Remote, State: d.AppState, ID: uint64(d.Index)}
			items[i].Name, _ = deliveredName(d) // a name that cannot be made is left out
		}
		err := deliverItems(ctx, path, items, log)
		for _, d := range conns {
			d.File.Close()
		}
		if err != nil {
			return failAll(conns, err)
		}
		return nil
	}
}

func deliverItems(ctx context.Context, path string, items []fdpass.Item, log *slog.Logger) error {
	// The application's acknowledgement names every connection.
	conn, err := fdpass.Dial(ctx, path, fdpass.Limits{MaxBatch: max(len(items), fdpass.DefaultMaxBatch)})
	if err != nil {
		return err
	}
	defer conn.Close()
	peer := conn.Peer()
	log.Info("delivering", "path", path, "sockets", len(items), "peer_pid", peer.PID, "peer_uid", peer.UID)
	if err := checkDeliverPeer(path, peer); err != nil {
		return err
	}
	if err := conn.SendSockets(items); err != nil {
		return err
	}
	_, err = conn.RecvAck()
	return err
}

func failAll(conns []*target.Delivered, err error) map[uint32]error {
	m := map[uint32]error{}
	for _, d := range conns {
		m[d.Index] = err
	}
	return m
}

// receivePolicy maps the policy flags.
func receivePolicy(c *cli.Context) (target.Policy, error) {
	p := target.Policy{
		MaxQueueBytes:  c.Uint64("max-queue-bytes"),
		MaxBytes:       c.Uint64("max-bytes"),
		PrepareTimeout: c.Duration("prepare-timeout"),
		CommitTimeout:  c.Duration("commit-timeout"),
	}
	var err error
	if p.AllowPorts, err = portsFlag(c, "allow-port"); err != nil {
		return p, err
	}
	n := c.Uint64("max-conns")
	if n == 0 || n > 1<<20 {
		return p, usageError{fmt.Errorf("--max-conns %d: want 1 to %d", n, 1<<20)}
	}
	p.MaxConnections = uint32(n)
	if p.MaxQueueBytes == 0 || p.MaxBytes == 0 {
		return p, usageError{errors.New("--max-queue-bytes and --max-bytes must be positive")}
	}
	return p, nil
}

// checkDeliverPeer refuses to hand sockets to a process the operator did
// not mean: the program listening at path must run as root or as the owner
// of the socket file, and the file's directory must belong to root or that
// owner and be writable by nobody else unless sticky (the rule
// fdpass.Listen applies on the program's side).
func checkDeliverPeer(path string, peer fdpass.Cred) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return fmt.Errorf("deliver: %w", err)
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		return fmt.Errorf("deliver: %w", err)
	}
	st, ok1 := fi.Sys().(*syscall.Stat_t)
	dst, ok2 := di.Sys().(*syscall.Stat_t)
	if !ok1 || !ok2 {
		return fmt.Errorf("deliver: cannot read the owners of %s and its directory", path)
	}
	switch {
	case peer.UID != 0 && peer.UID != st.Uid:
		return fmt.Errorf("deliver: the program listening on %s runs as uid %d, but the socket file belongs to uid %d: not delivering", path, peer.UID, st.Uid)
	case dst.Uid != 0 && dst.Uid != st.Uid:
		return fmt.Errorf("deliver: directory %s belongs to uid %d, who could replace the socket: not delivering", filepath.Dir(path), dst.Uid)
	case di.Mode().Perm()&0o022 != 0 && di.Mode()&fs.ModeSticky == 0:
		return fmt.Errorf("deliver: directory %s (mode %v) is writable by others, who could replace the socket: not delivering", filepath.Dir(path), di.Mode().Perm())
	}
	return nil
}
