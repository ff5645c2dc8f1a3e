// Package journal keeps the small durable record each agent writes about a
// migration in flight, so that `tcpmigrate recover` can clean up after a
// crash and an in-doubt source can be resolved. One file per migration and
// role, rewritten at every state change that matters for recovery; the
// connection list, which may be long, lives in a file of its own beside
// it, written once.
//
// Write makes a record durable: a new file, fsynced and renamed over the
// old, and the directory fsynced: it survives the machine's crash.
// Update only replaces the record, overwriting it in place when it can: it
// survives the agent's crash, not the machine's, and costs microseconds
// (no fsync, no new file, the connection list not rewritten), which is why
// the agents use it inside the freeze, where a machine crash would leave
// nothing to recover anyway (docs/faults.md). An in-place Update is not
// torn by the death of its writer (the old record or the new is left), but
// it is not atomic for a reader running at the same time, who may read a
// mix of both, which fails to decode: List skips such a record and says so
// (ErrBadRecord), and reading it again later finds it whole.
package journal

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/freeze"
)

// DefaultDir is where the agents keep their journals unless told otherwise.
const DefaultDir = "/run/tcpmigrate"

// Role says which agent wrote a record.
type Role string

// The roles.
const (
	Source Role = "source"
	Target Role = "target"
)

// Conn is what recovery needs to know of one connection.
type Conn struct {
	Index  uint32         `json:"index"`
	Local  netip.AddrPort `json:"local"`
	Remote netip.AddrPort `json:"remote"`
	// FD is the connection's descriptor in the owning process (source with
	// --pid), or -1.
	FD int `json:"fd"`
	// Family is the socket's address family (unix.AF_INET or AF_INET6).
	Family uint16 `json:"family"`
	// ReuseAddr is the socket's SO_REUSEADDR, which leaving repair clears.
	ReuseAddr bool `json:"reuse_addr,omitempty"`
}

// Record is one agent's view of one migration.
type Record struct {
	Migration string `json:"migration"`
	Role      Role   `json:"role"`
	// State is the agent's handoff state (its String form).
	State string `json:"state"`
	// Peer is the other agent's address, for an in-doubt query.
	Peer string `json:"peer,omitempty"`
	// Lock is the firewall instance holding this agent's locks.
	Lock string `json:"lock,omitempty"`
	// ListenLock is the table of the source's listener lock (the SYNs to
	// the listeners that move), if it takes listeners.
	ListenLock string `json:"listen_lock,omitempty"`
	// NetNS is the path of the network namespace the lock lives in, if not
	// the agent's own.
	NetNS string `json:"netns,omitempty"`
	// PID is the process whose sockets move (source with --pid), or 0.
	PID int `json:"pid,omitempty"`
	// Freeze is how the process was frozen, for freeze.ThawRecord.
	Freeze *freeze.Record `json:"freeze,omitempty"`
	// Released and Claimed are addresses moved by this agent.
	Released []netip.Prefix `json:"released,omitempty"`
	Claimed  []netip.Prefix `json:"claimed,omitempty"`
	Dev      string         `json:"dev,omitempty"`
	// AgentPID is the process ID of the agent that wrote the record.
	AgentPID int `json:"agent_pid"`
	// Conns are the connections of the migration. They are stored in a
	// file of their own (see Write), not in the record's.
	Conns   []Conn    `json:"-"`
	Updated time.Time `json:"updated"`
}

// Journal writes the records of one agent into a directory.
type Journal struct {
	dir string
}

// Open returns a journal in dir (created if missing; DefaultDir if empty).
func Open(dir string) (*Journal, error) {
	if dir == "" {
		dir = DefaultDir
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("journal: create %s: %w", dir, err)
	}
	return &Journal{dir: dir}, nil
}

// Dir returns the journal's directory.
func (j *Journal) Dir() string { return j.dir }

func (j *Journal) path(r *Record) string {
	return filepath.Join(j.dir, string(r.Role)+"-"+r.Migration+".json")
}

// connsPath is the file of r's connection list. Its name does not end in
// .json, so List does not take it for a record.
func (j *Journal) connsPath(r *Record) string {
	return filepath.Join(j.dir, string(r.Role)+"-"+r.Migration+".conns")
}

// Write stores r durably, replacing the previous record of the same
// migration and role: its connection list (when it has one) in a file of
// its own, then the record; each written, fsynced and renamed into place,
// and the directory fsynced.
func (j *Journal) Write(r *Record) error {
	if len(r.Conns) > 0 {
		b, err := json.Marshal(r.Conns)
		if err != nil {
			return fmt.Errorf("journal: encode %s: %w", r.Migration, err)
		}
		if err := j.replace(r, j.connsPath(r), b, true); err != nil {
			return err
		}
	}
	b, err := j.encode(r)
	if err != nil {
		return err
	}
	return j.replace(r, j.path(r), b, true)
}

// Update stores a change of r (its state, the addresses it moved) without
// its connection list, which stays as the last Write stored it, and
// without fsync: it survives the agent's crash, not the machine's.
//
// A record that exists and fits in one page is overwritten in place, with
// one write at offset 0 padded with spaces to the old length (JSON ignores
// them): the kernel copies a write within one page into the page cache
// without stopping for a signal, so a killed agent leaves the old record or
// the new (only a fault on the source buffer in mid-copy could split it,
// and the buffer was just written by this process), and it costs
// microseconds where a new file renamed over the old costs a quarter of a
// millisecond here (ext4 starts the new file's writeback at the rename).
// Otherwise the record is replaced through a new file and a rename.
func (j *Journal) Update(r *Record) error {
	b, err := j.encode(r)
	if err != nil {
		return err
	}
	p := j.path(r)
	if len(b) <= pageSize {
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err == nil {
			defer f.Close()
			st, err := f.Stat()
			if err == nil && st.Size() <= pageSize {
				for int64(len(b)) < st.Size() {
					b = append(b, ' ')
				}
				if _, err := f.WriteAt(b, 0); err != nil {
					return fmt.Errorf("journal: update %s: %w", r.Migration, err)
				}
				return nil
			}
		}
	}
	return j.replace(r, p, b, false)
}

// pageSize bounds the records Update overwrites in place.
const pageSize = 4096

func (j *Journal) encode(r *Record) ([]byte, error) {
	r.Updated = time.Now().UTC()
	r.AgentPID = os.Getpid()
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("journal: encode %s: %w", r.Migration, err)
	}
	return b, nil
}

// replace writes b to p through a temporary file and a rename, so that a
// reader finds the old content or the new, never a mix; with sync, the
// file and the directory are fsynced too.
func (j *Journal) replace(r *Record, p string, b []byte, sync bool) error {
	tmp := p + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("journal: write %s: %w", r.Migration, err)
	}
	_, werr := f.Write(b)
	var serr error
	if sync {
		serr = f.Sync()
	}
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("journal: write %s: %w", r.Migration, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("journal: write %s: %w", r.Migration, err)
	}
	if sync {
		if d, err := os.Open(j.dir); err == nil {
			d.Sync()
			d.Close()
		}
	}
	return nil
}

// Remove deletes the record of a finished migration and its connection
// list (the record first: a list without a record is never read).
func (j *Journal) Remove(r *Record) error {
	for _, p := range []string{j.path(r), j.connsPath(r)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("journal: remove %s: %w", r.Migration, err)
		}
	}
	return nil
}

// Read returns a stored record, with its connection list.
func (j *Journal) Read(role Role, migration string) (*Record, error) {
	return j.readFile(j.path(&Record{Role: role, Migration: migration}))
}

// ErrBadRecord is matched by the error List returns beside the records it
// could read: one or more files of the journal could not be read or
// decoded, and were skipped.
var ErrBadRecord = errors.New("journal: record skipped")

// List returns every record in the journal, each with its connection list.
// A record that cannot be read or decoded (or whose connection list cannot)
// does not hide the others: List skips it and returns every other record,
// with an error that matches ErrBadRecord and names each skipped file. A
// record removed while List runs is left out silently. Only a directory
// that cannot be read makes List return no records.
func (j *Journal) List() ([]*Record, error) {
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, fmt.Errorf("journal: list %s: %w", j.dir, err)
	}
	var out []*Record
	var bad []error
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		r, err := j.readFile(filepath.Join(j.dir, e.Name()))
		switch {
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			bad = append(bad, fmt.Errorf("%w: %w", ErrBadRecord, err))
		default:
			out = append(out, r)
		}
	}
	return out, errors.Join(bad...)
}

func (j *Journal) readFile(p string) (*Record, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("journal: read %s: %w", p, err)
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("journal: decode %s: %w", p, err)
	}
	cp := j.connsPath(&r)
	b, err = os.ReadFile(cp)
	if errors.Is(err, os.ErrNotExist) {
		return &r, nil
	}
	if err != nil {
		return nil, fmt.Errorf("journal: read %s: %w", cp, err)
	}
	if err := json.Unmarshal(b, &r.Conns); err != nil {
		return nil, fmt.Errorf("journal: decode %s: %w", cp, err)
	}
	return &r, nil
}
