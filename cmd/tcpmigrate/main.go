// Command tcpmigrate live-migrates established TCP connections between two
// Linux hosts with TCP_REPAIR.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := newApp().Run(os.Args); err != nil {
		if msg := err.Error(); msg != "" {
			fmt.Fprintln(os.Stderr, "tcpmigrate:", msg)
		}
		os.Exit(exitCode(err))
	}
}
