package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
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
	// Helper processes inherit this mark (agents pass their environment to
	// the programs they start), so that those a test leaves behind (a new
	// instance started by receive --exec outlives its agent) are found and
	// killed when the run ends.
	owner := strconv.Itoa(os.Getpid())
	os.Setenv(ownerEnv, owner)
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
	if n := killOwned(owner); n > 0 {
		fmt.Fprintf(os.Stderr, "killed %d helper processes left behind\n", n)
	}
	if code == 0 {
		if err := goleak.Find(goleak.IgnoreTopFunction("github.com/hashicorp/yamux.(*Session).keepalive")); err != nil {
			fmt.Fprintln(os.Stderr, "leaked goroutines:", err)
		}
	}
	os.Exit(code)
}

// ownerEnv marks the processes a test run started, with the run's PID.
const ownerEnv = "TCPM_E2E_OWNER"

// killOwned kills every process whose environment carries ownerEnv=owner
// and returns how many there were.
func killOwned(owner string) int {
	mark := []byte(ownerEnv + "=" + owner + "\x00")
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil || !bytes.Contains(env, mark) {
			continue
		}
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			n++
		}
	}
	return n
}
