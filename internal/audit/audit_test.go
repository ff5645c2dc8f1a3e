package audit

import (
	"bufio"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func readLines(t *testing.T, path string) []Record {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var recs []Record
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("line %q is not one JSON record: %v", sc.Text(), err)
		}
		recs = append(recs, r)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return recs
}

// TestOpenCreatesPrivateFileAndAppends checks the file's mode, that records
// are appended one per line after what was there, and their fields.
func TestOpenCreatesPrivateFileAndAppends(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	rec := &Record{Event: EventMigration, Peer: Peer{Addr: "198.18.0.2:40000", Subject: "CN=src,O=tcpmigrate"},
		Migration: "00ff", Connections: 2, Local: []string{"198.18.0.10:8080"}, Locals: 1,
		Verdicts: map[string]int{"ok": 1, "refused": 1}, Outcome: OutcomeCommitted,
		Refused: []Conn{{Index: 1, Local: "198.18.0.10:22", Verdict: "refused", Reason: "port 22 not allowed"}}}
	if err := l.Write(rec); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Write(rec); err == nil {
		t.Error("Write after Close succeeded")
	}
	// Reopening appends.
	l, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Write(&Record{Event: EventHandshake, Outcome: OutcomeRefused, Reason: "no source role"}); err != nil {
		t.Fatal(err)
	}
	l.Close()
	recs := readLines(t, path)
	if len(recs) != 2 {
		t.Fatalf("%d records, want 2", len(recs))
	}
	got := recs[0]
	if got.Time.IsZero() || got.Peer.Subject != "CN=src,O=tcpmigrate" || got.Verdicts["refused"] != 1 ||
		len(got.Refused) != 1 || got.Refused[0].Reason != "port 22 not allowed" || got.Outcome != OutcomeCommitted {
		t.Errorf("first record read back as %+v", got)
	}
	if recs[1].Event != EventHandshake || recs[1].Reason != "no source role" {
		t.Errorf("second record read back as %+v", recs[1])
	}
}

// TestOpenRefusesUnsafeFiles checks that a symbolic link, a directory and a
// file others can read are refused.
func TestOpenRefusesUnsafeFiles(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "real.log")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.log")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	open := filepath.Join(dir, "open.log")
	if err := os.WriteFile(open, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o644); err != nil { // whatever the umask
		t.Fatal(err)
	}
	for name, path := range map[string]string{"symlink": link, "world-readable": open} {
		if l, err := Open(path); !errors.Is(err, ErrUnsafeFile) {
			l.Close()
			t.Errorf("%s: Open = %v, want ErrUnsafeFile", name, err)
		}
	}
	if l, err := Open(dir); err == nil {
		l.Close()
		t.Error("Open of a directory succeeded")
	}
}

// TestConcurrentWritesStayWhole has many goroutines write long records at
// once: every line must parse on its own.
func TestConcurrentWritesStayWhole(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	const writers, each = 8, 50
	reason := strings.Repeat("x", 8<<10) // longer than a pipe buffer's atomic write
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				if err := l.Write(&Record{Event: EventMigration, Connections: uint32(w*each + i), Outcome: OutcomeAborted, Reason: reason}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	recs := readLines(t, path)
	if len(recs) != writers*each {
		t.Fatalf("%d records, want %d", len(recs), writers*each)
	}
	seen := map[uint32]bool{}
	for _, r := range recs {
		if r.Reason != reason {
			t.Fatalf("record %d has a mangled reason of %d bytes", r.Connections, len(r.Reason))
		}
		seen[r.Connections] = true
	}
	if len(seen) != writers*each {
		t.Errorf("%d distinct records, want %d", len(seen), writers*each)
	}
}

// TestNilLogDiscards checks that a nil Log is usable.
func TestNilLogDiscards(t *testing.T) {
	var l *Log
	if err := l.Write(&Record{Event: EventLink}); err != nil {
		t.Errorf("Write on nil: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("Close on nil: %v", err)
	}
}
