// Package journal keeps the small durable record each agent writes about a
// migration in flight, so that `tcpmigrate recover` can clean up after a
// crash and an in-doubt source can be resolved. One file per migration and
// role, rewritten atomically (write, fsync, rename, fsync the directory) at
// every state change that matters for recovery.
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
	AgentPID int       `json:"agent_pid"`
	Conns    []Conn    `json:"conns,omitempty"`
	Updated  time.Time `json:"updated"`
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

// Write stores r durably, replacing the previous record of the same
// migration and role.
func (j *Journal) Write(r *Record) error {
	r.Updated = time.Now().UTC()
	r.AgentPID = os.Getpid()
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("journal: encode %s: %w", r.Migration, err)
	}
	p := j.path(r)
	tmp := p + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("journal: write %s: %w", r.Migration, err)
	}
	_, werr := f.Write(b)
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("journal: write %s: %w", r.Migration, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("journal: write %s: %w", r.Migration, err)
	}
	if d, err := os.Open(j.dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// Remove deletes the record of a finished migration.
func (j *Journal) Remove(r *Record) error {
	if err := os.Remove(j.path(r)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("journal: remove %s: %w", r.Migration, err)
	}
	return nil
}

// Read returns a stored record.
func (j *Journal) Read(role Role, migration string) (*Record, error) {
	return readFile(filepath.Join(j.dir, string(role)+"-"+migration+".json"))
}

// List returns every record in the journal.
func (j *Journal) List() ([]*Record, error) {
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, fmt.Errorf("journal: list %s: %w", j.dir, err)
	}
	var out []*Record
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		r, err := readFile(filepath.Join(j.dir, e.Name()))
		if err != nil {
			return out, err
		}
		out = append(out, r)
	}
	return out, nil
}

func readFile(p string) (*Record, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("journal: read %s: %w", p, err)
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("journal: decode %s: %w", p, err)
	}
	return &r, nil
}
