package freeze

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCgroupRule(t *testing.T) {
	for _, c := range []struct {
		target, self string
		ok           bool
	}{
		{"/app.slice/app.service", "/system.slice/tcpmigrate.service", true},
		{"/app", "/application", true}, // a prefix of the name is not an ancestor
		{"/", "/x", false},             // the root cgroup
		{"", "/x", false},              // no cgroup v2 hierarchy
		{"/x", "/x", false},            // the caller's own cgroup
		{"/x", "/x/agent", false},      // an ancestor of the caller's
		{"/../other/app", "/", false},  // outside the caller's cgroup namespace
		{"/x/../y", "/z", false},
		{"/x/y", "/x", true}, // a child of the caller's cgroup
	} {
		why := cgroupRule(c.target, c.self)
		if (why == "") != c.ok {
			t.Errorf("cgroupRule(%q, %q) = %q, want freezer allowed %v", c.target, c.self, why, c.ok)
		}
	}
}

func TestUnescapeMount(t *testing.T) {
	if got := unescapeMount(`/sys/fs/cgroup\040two\\x`); got != `/sys/fs/cgroup two\\x` {
		t.Errorf("unescapeMount: %q", got)
	}
}

func TestReadStat(t *testing.T) {
	p := filepath.Join(t.TempDir(), "stat")
	line := "4242 (a) b) (c) T 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 7 0 987654321 12345 678 18446744073709551615\n"
	if err := os.WriteFile(p, []byte(line), 0o644); err != nil {
		t.Fatal(err)
	}
	st, err := readStat(p)
	if err != nil || st.state != 'T' || st.startTime != 987654321 {
		t.Errorf("readStat: %+v, %v; want state T start 987654321", st, err)
	}
	self, err := readStat("/proc/thread-self/stat") // the running thread: state R
	if err != nil || self.state != 'R' || self.startTime == 0 {
		t.Errorf("readStat of itself: %+v, %v", self, err)
	}
}
