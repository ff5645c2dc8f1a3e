package main

import (
	"io"
	"testing"
)

// TestExitCodes checks the exit status contract scripts rely on: 2 for a
// usage error of any kind, 1 for a failure.
func TestExitCodes(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"send"}, 2},                                            // a required flag missing
		{[]string{"send", "--to", "x", "--bogus"}, 2},                    // an unknown flag
		{[]string{"send", "--to", "198.18.0.3:1", "--insecure"}, 2},      // neither --pid nor --handoff
		{[]string{"send", "--to", "x", "--pid", "1", "--after", "x"}, 2}, // a bad value
		{[]string{"receive", "--listen", "x", "--insecure"}, 2},          // neither --exec nor --deliver
		{[]string{"list"}, 2},
		{[]string{"list", "--pid", "999999999"}, 1},                    // no such process: a failure, not a usage error
		{[]string{"list", "--pid", "999999999", "--port", "70000"}, 2}, // a port out of range
		{[]string{"receive", "--listen", "x", "--insecure", "--deliver", "unix:/x", "--claim-addr", "198.18.0.9/32"}, 2},               // --claim-addr without --dev
		{[]string{"receive", "--listen", "x", "--insecure", "--allow", "198.18.0.9/32", "--deliver", "unix:"}, 2},                      // --deliver without a path
		{[]string{"receive", "--listen", "x", "--insecure", "--allow", "198.18.0.9/32", "--deliver-waves", "--exec", "--", "true"}, 2}, // a second delivery would start a second program
	} {
		app := newApp()
		app.Writer, app.ErrWriter = io.Discard, io.Discard
		err := app.Run(append([]string{"tcpmigrate"}, tc.args...))
		if got := exitCode(err); err == nil || got != tc.want {
			t.Errorf("tcpmigrate %v: exit %d (%v), want %d", tc.args, got, err, tc.want)
		}
	}
}
