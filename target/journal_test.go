package target_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/tcpmigrate/tcpmigrate/internal/journal"
	"github.com/tcpmigrate/tcpmigrate/target"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// TestRestartKeepsOutcomesBesideBadRecord restarts a target over a journal
// that holds a committed and an aborted migration and, sorted before
// them, a record that cannot be decoded: the recorded outcomes are still
// answered (before, the first bad record made the target forget them all
// and answer Unknown, and a source would roll back connections that the
// target had delivered).
func TestRestartKeepsOutcomesBesideBadRecord(t *testing.T) {
	dir := t.TempDir()
	jr, err := journal.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	committed, aborted := transport.NewMigrationID(), transport.NewMigrationID()
	for id, st := range map[transport.MigrationID]string{committed: "committed", aborted: "aborted"} {
		if err := jr.Update(&journal.Record{Migration: id.String(), Role: journal.Target, State: st}); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "target-0.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv, err := target.NewServer(target.Config{JournalDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if st := srv.Outcome(committed); st != transport.StateCommitted {
		t.Errorf("committed migration answered %s", st)
	}
	if st := srv.Outcome(aborted); st != transport.StateAborted {
		t.Errorf("aborted migration answered %s", st)
	}
}
