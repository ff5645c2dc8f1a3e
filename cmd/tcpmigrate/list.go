package main

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/tcpmigrate/tcpmigrate/internal/procsock"
	"github.com/tcpmigrate/tcpmigrate/repair"
)

func listCommand() *cli.Command {
	return &cli.Command{
		Name:      "list",
		Usage:     "show the TCP connections of a process: which send --pid would take, and why not",
		UsageText: "tcpmigrate list --pid PID [--port N]... [--json]",
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "pid", Usage: "the process"},
			&cli.UintSliceFlag{Name: "port", Usage: "only connections on these local ports"},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
		},
		Action: func(c *cli.Context) error {
			if err := require(c, "pid"); err != nil {
				return err
			}
			ports, err := portsFlag(c, "port")
			if err != nil {
				return err
			}
			pid := c.Int("pid")
			socks, err := procsock.List(pid)
			if err != nil {
				return err
			}
			socks, _ = procsock.Filter(socks, ports)
			// Inspect shows what repair itself would refuse (kTLS, MD5, urgent data...).
			if socks, err = procsock.Inspect(pid, socks); err != nil {
				return err
			}
			// What send --pid would do with each socket: take it (a
			// connection with a descriptor), recreate it (a listener) or
			// take it from its listener's queue (pending).
			listeners := procsock.Listeners(socks, ports)
			moves := func(s procsock.Socket) string {
				switch {
				case s.Verdict.Take:
					return "yes"
				case s.State == repair.StateListen && slices.ContainsFunc(listeners, func(l procsock.Socket) bool { return l.Cookie == s.Cookie }):
					return "listener"
				case procsock.Pending(s, listeners):
					return "pending"
				}
				return "no"
			}
			if c.Bool("json") {
				type row struct {
					FDs     []int  `json:"fds"`
					Local   string `json:"local"`
					Remote  string `json:"remote"`
					State   string `json:"state"`
					RecvQ   uint32 `json:"recv_q"`
					SendQ   uint32 `json:"send_q"`
					Take    bool   `json:"take"`
					Moves   string `json:"moves"`
					Verdict string `json:"verdict"`
				}
				rows := []row{}
				for _, s := range socks {
					rows = append(rows, row{s.FDs, s.Local.String(), s.Remote.String(), s.State.String(), s.RecvQ, s.SendQ, s.Verdict.Take, moves(s), s.Verdict.Text})
				}
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(rows)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "FD\tLOCAL\tREMOTE\tSTATE\tRECV-Q\tSEND-Q\tMOVES\tWHY")
			for _, s := range socks {
				fd := "-"
				if len(s.FDs) > 0 {
					fd = fmt.Sprint(s.FDs)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\n", fd, s.Local, s.Remote, s.State, s.RecvQ, s.SendQ, moves(s), s.Verdict.Text)
			}
			return tw.Flush()
		},
	}
}
