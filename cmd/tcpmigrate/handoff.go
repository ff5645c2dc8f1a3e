package main

import (
	"context"
	"errors"

	"github.com/urfave/cli/v2"

	"github.com/tcpmigrate/tcpmigrate/internal/fdpass"
	"github.com/tcpmigrate/tcpmigrate/source"
)

// sendHandoff waits for a cooperating program to hand its sockets over on
// the unix socket, migrates them, then tells it which were committed and
// hands back the others. A program that hands them over live
// (fdpass.Conn.SendSocketsLive) serves them on until the migration is
// about to lock them: it is then sent a pause with their IDs, and the
// migration waits up to fdpass.DefaultPauseTimeout for its answer.
func sendHandoff(ctx context.Context, c *cli.Context, cfg source.Config) (*source.Result, error) {
	path, err := unixFlag(c, "handoff")
	if err != nil {
		return nil, err
	}
	ln, err := fdpass.Listen(path, fdpass.Policy{})
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	cfg.Log.Info("waiting for the program to hand its sockets over", "path", path)
	conn, err := ln.Accept()
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	msg, err := conn.RecvSocketsMessage()
	if err != nil {
		conn.SendError(err)
		return nil, err
	}
	items := msg.Items
	if msg.Live {
		// The paused states go into items too: a rollback hands them back.
		cfg.Pause = func(ctx context.Context, idx []int) ([][]byte, error) {
			return conn.PauseItems(ctx, items, idx, fdpass.DefaultPauseTimeout)
		}
		cfg.PauseWaves = c.Bool("pause-waves")
	}
	conns := make([]source.Conn, len(items))
	for i, it := range items {
		conns[i] = source.Conn{File: it.File, AppState: it.State, OwnerFD: -1}
	}
	res, merr := source.Migrate(ctx, cfg, conns)
	var committed []uint64
	var back []fdpass.Item
	for i, cr := range res.Conns {
		if cr.Outcome == source.Committed {
			committed = append(committed, items[i].ID)
		} else {
			back = append(back, items[i])
		}
	}
	var errs []error
	if len(back) > 0 {
		errs = append(errs, conn.HandBack(back))
		errs = append(errs, fdpass.CloseItems(back))
	}
	if len(committed) > 0 {
		errs = append(errs, conn.SendCommitted(committed))
	}
	return res, errors.Join(append([]error{merr}, errs...)...)
}
