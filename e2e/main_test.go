package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"
)

// bin is the tcpmigrate binary the CLI tests run, built once.
var bin string

func TestMain(m *testing.M) {
	// The test binary doubles as the helper programs of the scale test.
	switch os.Getenv("TCPM_E2E_HELPER") {
	case "peer":
		os.Exit(scalePeer())
	case "responder":
		os.Exit(scaleResponder())
	case "vm-workload":
		os.Exit(vmWorkload())
	case "vm-arrival":
		os.Exit(vmArrival())
	case "listen-server":
		os.Exit(listenServer())
	}
	dir, err := os.MkdirTemp("", "tcpmigrate-e2e")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "tcpmigrate")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/tcpmigrate/tcpmigrate/cmd/tcpmigrate").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build tcpmigrate: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(goleak.IgnoreTopFunction("github.com/hashicorp/yamux.(*Session).keepalive")); err != nil {
			fmt.Fprintln(os.Stderr, "leaked goroutines:", err)
		}
	}
	os.Exit(code)
}
