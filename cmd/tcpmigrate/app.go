package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/urfave/cli/v2"
)

// usageError marks errors in how the command was called (exit status 2).
type usageError struct{ error }

func newApp() *cli.App {
	onUsage := func(_ *cli.Context, err error, _ bool) error { return usageError{err} }
	app := &cli.App{
		Name:  "tcpmigrate",
		Usage: "live-migrate established TCP connections between Linux hosts",
		Commands: []*cli.Command{
			sendCommand(),
			receiveCommand(),
			listCommand(),
			recoverCommand(),
			certsCommand(),
			benchCommand(),
			demoCommand(),
		},
		OnUsageError: onUsage,
		CommandNotFound: func(_ *cli.Context, name string) {
			fmt.Fprintf(os.Stderr, "tcpmigrate: no command %q (see tcpmigrate help)\n", name)
			os.Exit(2)
		},
		// main decides the exit status (0 done, 1 failed or rolled back, 2 usage).
		ExitErrHandler: func(*cli.Context, error) {},
	}
	for _, c := range app.Commands {
		c.OnUsageError = onUsage
	}
	return app
}

func exitCode(err error) int {
	var ue usageError
	var ec cli.ExitCoder
	switch {
	case errors.As(err, &ue):
		return 2
	case errors.As(err, &ec):
		return ec.ExitCode()
	}
	return 1
}

// require returns a usage error naming the first of the flags that is not
// set.
func require(c *cli.Context, names ...string) error {
	for _, n := range names {
		if !c.IsSet(n) {
			return usageError{fmt.Errorf("--%s is required", n)}
		}
	}
	return nil
}
