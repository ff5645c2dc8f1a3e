package e2e

import (
	"path/filepath"
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
	if len(segs) != 0 {
		t.Errorf("RST or FIN on the bridge: %d segments, first %s", len(segs), segs[0])
	}
}

// stop ends the capture without judging (the documented loss).
func (w *watch) stop() { w.capture.Stop() }
