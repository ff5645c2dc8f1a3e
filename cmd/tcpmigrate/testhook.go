package main

import (
	"os"
	"time"
)

// testHang returns a fault hook for the end-to-end crash tests: when the
// environment names a step in TCPMIGRATE_TEST_HANG, the agent reaching
// that step creates the file TCPMIGRATE_TEST_HANG_FILE and blocks there, so
// that the test can act at that exact point: for ever (the test kills the
// agent), or, with TCPMIGRATE_TEST_HANG_MODE=pause, until the test removes
// the file (the test cuts the link meanwhile). Unset, it returns nil and
// costs nothing.
func testHang[S ~string]() func(S) error {
	step := os.Getenv("TCPMIGRATE_TEST_HANG")
	if step == "" {
		return nil
	}
	file, pause := os.Getenv("TCPMIGRATE_TEST_HANG_FILE"), os.Getenv("TCPMIGRATE_TEST_HANG_MODE") == "pause"
	return func(s S) error {
		if string(s) != step {
			return nil
		}
		if f, err := os.Create(file); err == nil {
			f.Close()
		}
		if !pause {
			select {}
		}
		for {
			if _, err := os.Stat(file); err != nil {
				return nil
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}
