package main

import (
	"errors"

	"github.com/urfave/cli/v2"
)

// usageError marks errors in how the command was called (exit status 2).
type usageError struct{ error }

func newApp() *cli.App {
	return &cli.App{
		Name:  "tcpmigrate",
		Usage: "live-migrate established TCP connections between Linux hosts",
		Commands: []*cli.Command{
			sendCommand(),
			receiveCommand(),
			listCommand(),
			recoverCommand(),
			certsCommand(),
			demoCommand(),
			benchCommand(),
		},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error { return usageError{err} },
	}
}

func exitCode(err error) int {
	var ue usageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}
