// Package audit writes the target agent's audit trail: one JSON object per
// line, one line per migration (and per refused handshake or query), to a
// file the operator names (tcpmigrate receive --audit-log FILE).
//
// Invariants: the file is opened with O_APPEND|O_CREATE|O_NOFOLLOW and mode
// 0600, and refused if it is not a regular file or if group or others may
// read or write it; every Record is written with a single write(2), so
// lines from concurrent writers (and other processes appending to the same
// file) never interleave; a nil *Log discards records, so callers need no
// check.
package audit

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"syscall"
	"time"
)

// Events, the kind of thing a Record describes.
const (
	// EventMigration is a link that opened a migration with Prepare,
	// whatever became of it.
	EventMigration = "migration"
	// EventQuery is a link that asked for the outcome of an earlier
	// migration.
	EventQuery = "query"
	// EventHandshake is a link refused during its handshake (certificate
	// role, TLS, protocol).
	EventHandshake = "handshake"
	// EventLink is a link that ended before saying what it wanted.
	EventLink = "link"
)

// Outcomes of a Record.
const (
	// OutcomeCommitted means the migration committed: the target owns its
	// connections (those it did not refuse).
	OutcomeCommitted = "committed"
	// OutcomeAborted means the migration was rolled back: the source keeps
	// every connection.
	OutcomeAborted = "aborted"
	// OutcomeRefused means the target refused the link or the migration as
	// a whole before creating anything.
	OutcomeRefused = "refused"
	// OutcomeAnswered means a query was answered.
	OutcomeAnswered = "answered"
)

// MaxListed bounds the number of elements of Record.Local and
// Record.Refused, so that a migration of many connections still makes a
// line of reasonable size; the counts say how many there were in all.
const MaxListed = 64

// Peer is who was at the other end of a link.
type Peer struct {
	// Addr is the peer's network address, "host:port".
	Addr string `json:"addr,omitempty"`
	// Subject is the distinguished name of the peer's certificate; empty
	// on an insecure link or when the TLS handshake did not get that far.
	Subject string `json:"subject,omitempty"`
	// Serial is the certificate's serial number, in hexadecimal.
	Serial string `json:"serial,omitempty"`
	// Roles are the tcpmigrate roles the certificate names.
	Roles []string `json:"roles,omitempty"`
}

// Conn is one connection the target did not take, and why.
type Conn struct {
	Index   uint32 `json:"index"`
	Local   string `json:"local,omitempty"`
	Remote  string `json:"remote,omitempty"`
	Verdict string `json:"verdict"`
	Reason  string `json:"reason,omitempty"`
}

// Record is one line of the audit log.
type Record struct {
	// Time is when the link ended (or the handshake was refused).
	Time time.Time `json:"time"`
	// Event says what the record describes (EventMigration, ...).
	Event string `json:"event"`
	// Peer is who asked.
	Peer Peer `json:"peer"`
	// Migration is the migration's ID, in hexadecimal.
	Migration string `json:"migration,omitempty"`
	// Connections is the number of connections the source announced.
	Connections uint32 `json:"connections,omitempty"`
	// Local lists the distinct local addresses ("addr:port") of the
	// connections that arrived, at most MaxListed of them; Locals counts
	// them all.
	Local  []string `json:"local,omitempty"`
	Locals int      `json:"locals,omitempty"`
	// Verdicts counts the connections by verdict ("ok", "refused", ...).
	Verdicts map[string]int `json:"verdicts,omitempty"`
	// Delivered counts the connections handed to the application.
	Delivered int `json:"delivered,omitempty"`
	// Outcome is what became of it (OutcomeCommitted, ...).
	Outcome string `json:"outcome"`
	// Reason says why, for an outcome other than committed or answered.
	Reason string `json:"reason,omitempty"`
	// Refused lists connections that were not delivered, at most MaxListed
	// of them (the Verdicts counts are complete).
	Refused []Conn `json:"refused,omitempty"`
	// Duration is how long the link lasted, in seconds.
	Duration float64 `json:"duration_s,omitempty"`
}

// ErrUnsafeFile means the audit file could be read or replaced by someone
// other than its owner, or is not a regular file.
var ErrUnsafeFile = errors.New("audit: unsafe audit file")

// Log appends records to one file. It is safe for concurrent use.
type Log struct {
	mu sync.Mutex // guards f and serialises writes
	f  *os.File
}

// Open opens (or creates) the audit file at path for appending. The file
// is created with mode 0600; an existing file must be a regular file (not
// a symbolic link) that neither group nor others can read or write.
func Open(path string) (*Log, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("%w: open %s: it is a symbolic link", ErrUnsafeFile, path)
		}
		return nil, fmt.Errorf("audit: open %s: %w", path, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("audit: open %s: %w", path, err)
	}
	switch {
	case !fi.Mode().IsRegular():
		err = fmt.Errorf("%w: open %s: not a regular file (%v)", ErrUnsafeFile, path, fi.Mode().Type())
	case fi.Mode().Perm()&0o077 != 0:
		err = fmt.Errorf("%w: open %s: mode %v lets group or others read or write it (chmod 600 it)",
			ErrUnsafeFile, path, fi.Mode().Perm())
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return &Log{f: f}, nil
}

// Write appends r as one line. A zero Time is set to the current time.
// Write on a nil Log does nothing.
func (l *Log) Write(r *Record) error {
	if l == nil {
		return nil
	}
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	r.Time = r.Time.UTC()
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("audit: encode record: %w", err)
	}
	b = append(b, '\n')
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return fmt.Errorf("audit: write: %w", fs.ErrClosed)
	}
	// One write: O_APPEND makes it land whole at the end of the file.
	if _, err := l.f.Write(b); err != nil {
		return fmt.Errorf("audit: write: %w", err)
	}
	return nil
}

// Close closes the file. Later writes fail; Close on a nil Log does
// nothing.
func (l *Log) Close() error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	if err != nil {
		return fmt.Errorf("audit: close: %w", err)
	}
	return nil
}
