// Command tcpmigrate live-migrates established TCP connections between two
// Linux hosts with TCP_REPAIR.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := newApp().Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "tcpmigrate:", err)
		os.Exit(exitCode(err))
	}
}
