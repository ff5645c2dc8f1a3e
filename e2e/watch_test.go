package e2e

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// watch judges a run from outside the tool: the peer's own reset counters,
// and a capture on the bridge of every RST and FIN of the service's port.
type watch struct {
	peer    *lab.NS
	before  int64
	capture *lab.Capture
}

// startWatch reads the peer's counters and starts the capture.
func startWatch(t *testing.T, lan *lab.LAN, peer *lab.NS, v6 bool) *watch {
	t.Helper()
	before, err := peer.Resets()
	if err != nil {
		t.Fatal(err)
	}
	c, err := lan.CaptureFlags(svcPort, v6, filepath.Join(t.TempDir(), "cap.pcap"))
	if err != nil {
		t.Fatal(err)
	}
	return &watch{peer: peer, before: before, capture: c}
}

// quiet stops the capture and fails the test if the peer counted a reset
// or the bridge saw an RST or a FIN.
func (w *watch) quiet(t *testing.T) {
	t.Helper()
	if fins := w.noReset(t); fins > 0 {
		t.Errorf("FIN on the bridge: %d segments", fins)
	}
}

// noReset stops the capture and fails the test if the peer counted a reset
// or the bridge saw an RST; it returns how many FINs the bridge saw (a test
// of closing connections expects them).
func (w *watch) noReset(t *testing.T) (fins int) {
	t.Helper()
	after, err := w.peer.Resets()
	if err != nil {
		t.Fatal(err)
	}
	if after != w.before {
		t.Errorf("the peer counted %d resets", after-w.before)
	}
	segs, err := w.capture.Stop()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range segs {
		switch {
		case strings.Contains(s, "Flags [R"):
			t.Errorf("RST on the bridge: %s", s)
		case strings.Contains(s, "Flags [F"):
			fins++
		}
	}
	return fins
}

// stop ends the capture without judging (the documented loss).
func (w *watch) stop() { w.capture.Stop() }
