package e2e

import (
	"os/exec"
	"regexp"
	"testing"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// TestDemo runs the README's main job, `tcpmigrate demo`, small: it must
// migrate every connection, verify every byte and report no reset.
func TestDemo(t *testing.T) {
	lab.Require(t)
	out, err := exec.Command(bin, "demo", "--conns", "4", "--before", "300ms", "--after", "500ms").CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("tcpmigrate demo: %v", err)
	}
	for _, want := range []string{
		`connections migrated\s+4\n`,
		`every byte once and in order`,
		`resets seen by the peer\s+0\n`,
	} {
		if !regexp.MustCompile(want).Match(out) {
			t.Errorf("the report lacks %q", want)
		}
	}
}
