package main

import (
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/tcpmigrate/tcpmigrate/internal/recovery"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

func recoverCommand() *cli.Command {
	return &cli.Command{
		Name:      "recover",
		Usage:     "clean up after an agent that died mid-migration: roll back or finish, thaw, unlock",
		UsageText: "tcpmigrate recover [--journal-dir DIR] [--cert F --key F --ca F | --insecure] [--dry-run]",
		Flags: append(append([]cli.Flag{
			&cli.BoolFlag{Name: "dry-run", Usage: "say what would be done, do nothing"},
		}, tlsFlags...), logFlags...),
		Action: func(c *cli.Context) error {
			var tc *transport.Config
			if c.Bool("insecure") || c.IsSet("cert") {
				var err error
				if tc, err = transportConfig(c); err != nil {
					return err
				}
				requireTarget(tc)
			}
			acts, err := recovery.Run(c.Context, recovery.Options{JournalDir: c.String("journal-dir"), Transport: tc, DryRun: c.Bool("dry-run")})
			for _, a := range acts {
				line := a.Decision
				if a.Migration != "" {
					line = fmt.Sprintf("%s %s (journal: %s): %s", a.Role, a.Migration, a.State, a.Decision)
				}
				if a.Err != nil {
					line += ": " + a.Err.Error()
				}
				fmt.Println(line)
			}
			if len(acts) == 0 && err == nil {
				fmt.Println("nothing to recover")
			}
			return err
		},
	}
}
