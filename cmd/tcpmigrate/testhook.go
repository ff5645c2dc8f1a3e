package main

import (
	"os"
)

// testHang returns a fault hook for the end-to-end crash tests: when the
// environment names a step in TCPMIGRATE_TEST_HANG, the agent reaching
// that step creates the file TCPMIGRATE_TEST_HANG_FILE and blocks there
// for ever, so that the test can kill it at that exact point. Unset, it
// returns nil and costs nothing.
func testHang[S ~string]() func(S) error {
	step := os.Getenv("TCPMIGRATE_TEST_HANG")
	if step == "" {
		return nil
	}
	return func(s S) error {
		if string(s) == step {
			if f, err := os.Create(os.Getenv("TCPMIGRATE_TEST_HANG_FILE")); err == nil {
				f.Close()
			}
			select {}
		}
		return nil
	}
}
