package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// childEnv makes the test binary a child of the benchmark (ChildMain).
const childEnv = "TCPMIGRATE_BENCH_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		if err := ChildMain(context.Background(), os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestBench runs the benchmark on 50 connections, 10 of them streaming and
// 40 with 64 KiB queued each way, and checks that the report is complete
// and consistent: every connection committed and verified at both ends, no
// reset at the peer, every distribution ordered, bytes and memory counted.
// It asserts no time: performance is what the report shows, not a test.
func TestBench(t *testing.T) {
	lab.Require(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const conns, streams, queue = 50, 10, 64 << 10
	o := Options{Conns: conns, Queue: queue, StreamConns: streams, Calibrate: 20,
		Child: []string{exe}, ChildEnv: []string{childEnv + "=1"}}
	if testing.Verbose() {
		o.Log = os.Stderr
	}
	r, err := Run(ctx, o)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	for _, bad := range r.Consistent() {
		t.Error(bad)
	}
	if r.Conns != conns || r.StreamConns != streams || r.QueueBytes != queue || r.CalibrationConns != 20 {
		t.Errorf("report of %d connections (%d streaming, %d queued bytes, %d calibrated), want %d (%d, %d, 20)",
			r.Conns, r.StreamConns, r.QueueBytes, r.CalibrationConns, conns, streams, queue)
	}
	// Every static connection carried its queues: 64 KiB each way, less
	// what the peer's kernel may still take into its receive buffer once
	// priming is done (two segments, 2,920 bytes, in every run seen). The
	// streams' receive queues are about empty: the workload serves them
	// until the agent pauses it, just before the lock.
	if min := int64(conns-streams) * (2*queue - 4096); r.StateBytes < min {
		t.Errorf("state bytes %d, want at least %d", r.StateBytes, min)
	}
	if !r.LiveHandoff {
		t.Error("the workload did not hand its sockets over live")
	}
	if r.Stall != nil && r.Stall.Unresolved != 0 {
		t.Errorf("%d streams did not resume", r.Stall.Unresolved)
	}
	var phases []string
	for _, p := range r.Phases {
		phases = append(phases, p.Name)
	}
	for _, want := range []string{"pause", "reinspect", "hold", "lock", "dump+restore", "switch", "commit"} {
		if !contains(phases, want) {
			t.Errorf("phases %v lack %q", phases, want)
		}
	}

	// The JSON object has the fields docs/performance.md describes.
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"conns", "freeze_us", "stall_us", "phases_us", "dump_us_per_conn", "restore_us_per_conn",
		"syscall_floor_us_per_conn", "wire_bytes", "state_bytes", "peak_rss_bytes"} {
		if m[k] == nil {
			t.Errorf("JSON report lacks %q", k)
		}
	}
	for _, k := range []string{"freeze_us", "dump_us_per_conn", "restore_us_per_conn"} {
		d, _ := m[k].(map[string]any)
		for _, q := range []string{"min", "p50", "p99", "max"} {
			if _, ok := d[q].(float64); !ok {
				t.Errorf("%s.%s missing", k, q)
			}
		}
	}
	rss, _ := m["peak_rss_bytes"].(map[string]any)
	for _, k := range []string{"source", "target"} {
		if v, _ := rss[k].(float64); v <= 0 {
			t.Errorf("peak_rss_bytes.%s = %v", k, rss[k])
		}
	}
	if t.Failed() || testing.Verbose() {
		r.WriteTable(testWriter{t})
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// TestDist pins the nearest-rank percentiles.
func TestDist(t *testing.T) {
	ds := make([]time.Duration, 100)
	for i := range ds {
		ds[i] = time.Duration(100-i) * time.Microsecond // 100 µs down to 1 µs
	}
	got := distOf(ds)
	want := Dist{Min: 1, P50: 50, P99: 99, Max: 100}
	if *got != want {
		t.Errorf("distOf(1..100 µs) = %+v, want %+v", *got, want)
	}
	if one := distOf([]time.Duration{1500 * time.Nanosecond}); *one != (Dist{1.5, 1.5, 1.5, 1.5}) {
		t.Errorf("distOf(1.5 µs) = %+v", *one)
	}
	if distOf(nil) != nil {
		t.Error("distOf(nil) is not nil")
	}
}
