package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/tcpmigrate/tcpmigrate/internal/activation"
	"github.com/tcpmigrate/tcpmigrate/internal/addrmove"
	"github.com/tcpmigrate/tcpmigrate/internal/fdpass"
	"github.com/tcpmigrate/tcpmigrate/target"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

func receiveCommand() *cli.Command {
	return &cli.Command{
		Name:  "receive",
		Usage: "accept migrations from source agents and deliver the connections",
		UsageText: "tcpmigrate receive --listen HOST:PORT (--cert F --key F --ca F | --insecure) [--allow CIDR]... " +
			"[--claim-addr CIDR --dev IFACE] [--once] (--exec -- CMD [ARG...] | --deliver unix:PATH)",
		Flags: append(append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Required: true, Usage: "address to accept source agents on, HOST:PORT"},
			&cli.StringSliceFlag{Name: "allow", Usage: "local addresses (CIDR) connections may be restored for"},
			&cli.StringFlag{Name: "claim-addr", Usage: "service address (CIDR) to claim at the switch; also allowed"},
			&cli.StringFlag{Name: "dev", Usage: "interface of --claim-addr"},
			&cli.BoolFlag{Name: "once", Usage: "exit after one migration: 0 if it committed"},
			&cli.BoolFlag{Name: "exec", Usage: "start the command after -- with the sockets as fds 3, 4, ... (systemd socket activation)"},
			&cli.StringFlag{Name: "deliver", Usage: "unix:PATH of a running program to pass the sockets to"},
		}, tlsFlags...), logFlags...),
		Action: runReceive,
	}
}

func runReceive(c *cli.Context) error {
	execArgs := c.Args().Slice()
	if c.Bool("exec") == (c.String("deliver") != "") {
		return usageError{errors.New("give exactly one of --exec -- CMD and --deliver unix:PATH")}
	}
	if c.Bool("exec") && len(execArgs) == 0 {
		return usageError{errors.New("--exec needs a command after --")}
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
	for _, s := range c.StringSlice("allow") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return usageError{fmt.Errorf("--allow: %w", err)}
		}
		cfg.Allow = append(cfg.Allow, p)
	}
	if s := c.String("claim-addr"); s != "" {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return usageError{fmt.Errorf("--claim-addr: %w", err)}
		}
		if c.String("dev") == "" {
			return usageError{errors.New("--claim-addr needs --dev")}
		}
		am := addrmove.Config{Prefix: p, Dev: c.String("dev")}
		cfg.Allow = append(cfg.Allow, netip.PrefixFrom(p.Addr(), p.Addr().BitLen()))
		cfg.Claim = func(ctx context.Context, _ []netip.Prefix) error { return addrmove.Claim(ctx, am) }
		cfg.Unclaim = func(ctx context.Context, _ []netip.Prefix) error { return addrmove.Release(ctx, am) }
	}
	if len(cfg.Allow) == 0 {
		return usageError{errors.New("give --allow or --claim-addr: the target restores nothing by default")}
	}
	if c.Bool("exec") {
		cfg.Deliver = execDeliver(execArgs)
	} else {
		path, ok := strings.CutPrefix(c.String("deliver"), "unix:")
		if !ok {
			return usageError{errors.New("--deliver takes unix:PATH")}
		}
		cfg.Deliver = socketDeliver(path)
	}
	srv, err := target.NewServer(cfg)
	if err != nil {
		return err
	}
	ln, err := transport.Listen(c.String("listen"), tcfg)
	if err != nil {
		return err
	}
	defer ln.Close()
	log.Info("listening", "addr", ln.Addr().String())
	if !c.Bool("once") {
		return srv.Serve(c.Context, ln)
	}
	for {
		link, err := ln.Accept()
		if err != nil {
			return err
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
			if names[i], err = activation.Name(d.Local, d.Remote); err != nil {
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
func socketDeliver(path string) func(context.Context, []*target.Delivered) map[uint32]error {
	return func(ctx context.Context, conns []*target.Delivered) map[uint32]error {
		items := make([]fdpass.Item, len(conns))
		for i, d := range conns {
			items[i] = fdpass.Item{File: d.File, Local: d.Local, Remote: d.Remote, State: d.AppState, ID: uint64(d.Index)}
		}
		err := deliverItems(ctx, path, items)
		for _, d := range conns {
			d.File.Close()
		}
		if err != nil {
			return failAll(conns, err)
		}
		return nil
	}
}

func deliverItems(ctx context.Context, path string, items []fdpass.Item) error {
	conn, err := fdpass.Dial(ctx, path, fdpass.Limits{})
	if err != nil {
		return err
	}
	defer conn.Close()
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
