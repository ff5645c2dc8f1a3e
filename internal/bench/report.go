package bench

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// Dist summarises a distribution of durations, in microseconds. The
// percentiles are nearest-rank: P99 of fewer than 100 values is the
// largest, of 100 to 199 values the largest but one.
type Dist struct {
	Min float64 `json:"min"`
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

// distOf summarises ds; an empty ds gives nil.
func distOf(ds []time.Duration) *Dist {
	if len(ds) == 0 {
		return nil
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	rank := func(p float64) float64 {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		return us(s[max(0, min(i, len(s)-1))])
	}
	return &Dist{Min: us(s[0]), P50: rank(0.50), P99: rank(0.99), Max: us(s[len(s)-1])}
}

// us converts d to microseconds, rounded to a tenth.
func us(d time.Duration) float64 { return math.Round(float64(d)/100) / 10 }

// ordered reports whether min ≤ p50 ≤ p99 ≤ max.
func (d *Dist) ordered() bool {
	return d == nil || d.Min <= d.P50 && d.P50 <= d.P99 && d.P99 <= d.Max
}

// Phase is one phase of the migration as the source agent timed it
// (source.Result.Phases), in microseconds.
type Phase struct {
	Name string  `json:"name"`
	US   float64 `json:"us"`
}

// Stall is what the streaming peers saw, one value per streaming
// connection in each distribution.
type Stall struct {
	// Arrival is the longest gap between bytes arriving at the peer
	// application (streamcheck.Endpoint.MaxGap) over the whole run.
	Arrival *Dist `json:"arrival"`
	// Acked is the longest time, during the move, in which the peer's
	// tcpi_bytes_acked did not advance: how long the peer's own sending
	// stalled (sampled every millisecond).
	Acked *Dist `json:"acked"`
	// Received is the same for the peer's tcpi_bytes_received: bytes
	// reaching the peer's kernel, sampled every millisecond during the move.
	Received *Dist `json:"received"`
	// Unresolved counts connections whose acknowledgements had not resumed
	// when sampling stopped; their Acked value is a lower bound.
	Unresolved int `json:"unresolved"`
}

// Floor is the bare syscall sequence of a dump and of a restore: the same
// system calls as repair.Capture and repair.Restore, in the same order,
// with no checks and no Go-side work, timed on the same connections.
type Floor struct {
	Dump    *Dist `json:"dump"`
	Restore *Dist `json:"restore"`
}

// RSS is the peak resident memory (VmHWM) of each process, in bytes.
type RSS struct {
	Source int64 `json:"source"`
	Target int64 `json:"target"`
	// Bench is the bench process: the workload and the measurements.
	Bench int64 `json:"bench"`
	// Peer is the process holding the peer's ends of the connections.
	Peer int64 `json:"peer"`
}

// Peer is what the peer and the workload checked once the move was over.
type Peer struct {
	// Resets is the change in the peer's Tcp EstabResets + OutRsts counters
	// (/proc/net/snmp of its namespace) from before the move until every
	// check was done, before anything was closed.
	Resets int64 `json:"resets"`
	// Verified counts connections whose bytes were all verified both ways
	// after the move (queued bytes and a tail for static connections, the
	// checksummed streams for streaming ones).
	Verified int `json:"verified"`
	// ToPeer and FromPeer are the bytes verified at the peer and at the
	// workload over the whole run.
	ToPeer   int64 `json:"to_peer_bytes"`
	FromPeer int64 `json:"from_peer_bytes"`
	// Retransmits, Timeouts and LossProbes are the changes, over the same
	// span as Resets, in the peer's RetransSegs, TCPTimeouts (retransmission
	// timeouts) and TCPLossProbes (tail loss probes): what the lock cost the
	// peer's own sending.
	Retransmits int64 `json:"retransmits"`
	Timeouts    int64 `json:"rto_timeouts"`
	LossProbes  int64 `json:"loss_probes"`
}

// Env describes the machine and its load around the run.
type Env struct {
	Time string `json:"time"`
	// Revision is the commit the binary was built from ("+modified" when
	// the work tree had changes), when the build recorded it.
	Revision   string     `json:"revision,omitempty"`
	Kernel     string     `json:"kernel"`
	CPUs       int        `json:"cpus"`
	Go         string     `json:"go"`
	LoadBefore [3]float64 `json:"load_before"`
	LoadAfter  [3]float64 `json:"load_after"`
}

// Report is what one run measured. Durations are in microseconds.
type Report struct {
	// Conns is how many connections were migrated; Committed how many the
	// source agent reported committed.
	Conns     int `json:"conns"`
	Committed int `json:"committed"`
	// HandedBack counts connections that rolled back (the target refused
	// or failed them) and that the source agent handed back to the
	// workload, which went on with them and checked them like the others.
	HandedBack int `json:"handed_back"`
	// Held is how many connections the source held with a zero window
	// before the lock (0 with --no-hold, or when the hold is unavailable).
	Held int `json:"held"`
	// Precopied is how many connections the source captured before the
	// lock and the target restored ahead of the freeze (0 with
	// --no-precopy); Confirmed is how many of those copies still stood
	// after the lock: the rest were captured again inside the freeze.
	Precopied int `json:"precopied"`
	Confirmed int `json:"confirmed"`
	// Premade is how many connections the target restored on a socket it
	// made before the freeze (repair.Blank), while the source held them.
	Premade int `json:"premade"`
	// State is the source agent's final state.
	State string `json:"state"`
	// QueueBytes is what each static connection had queued each way.
	QueueBytes int `json:"queue_bytes"`
	// StreamConns is how many of Conns streamed both ways during the move,
	// each writing 16 KiB every StreamIntervalUS.
	StreamConns      int     `json:"stream_conns"`
	StreamIntervalUS float64 `json:"stream_interval_us,omitempty"`

	// Freeze is each connection's freeze (source.ConnResult.Freeze).
	Freeze *Dist `json:"freeze_us"`
	// FreezeExclSwitch is Freeze minus the switch phase, which lies wholly
	// inside every freeze: the freeze with the address move excluded.
	FreezeExclSwitch *Dist `json:"freeze_excl_switch_us"`
	// Stall is nil unless some connections streamed.
	Stall *Stall `json:"stall_us"`
	// Phases are the source agent's phases in order, and TotalUS their sum.
	Phases  []Phase `json:"phases_us"`
	TotalUS float64 `json:"total_us"`
	// LiveHandoff says the workload handed its sockets over live and
	// served them until the source agent's pause (Options.PausedHandoff
	// false).
	LiveHandoff bool `json:"live_handoff"`
	// DeliverWaves says the target agent delivered the busy connections
	// first, in a call of their own (Options.OneDelivery false).
	DeliverWaves bool `json:"deliver_waves"`
	// HandoffUS runs from the workload's pause (it stops using its
	// sockets) until every socket is in the source agent's hands, or after
	// a live hand-over until the workload has answered the agent's pause;
	// PauseUS from the same pause until the last socket is back in the
	// workload's hands on the target: how long the application was
	// stopped.
	HandoffUS float64 `json:"handoff_us"`
	PauseUS   float64 `json:"workload_pause_us"`

	// CalibrationConns is how many connections of the same kind the
	// per-connection costs below were timed on, one at a time.
	CalibrationConns int `json:"calibration_conns"`
	// Inspect, Dump and Restore time repair.Inspect, repair.Capture and
	// repair.Restore; Floor the bare syscall sequences of the last two.
	Inspect *Dist `json:"inspect_us_per_conn"`
	Dump    *Dist `json:"dump_us_per_conn"`
	Restore *Dist `json:"restore_us_per_conn"`
	Floor   Floor `json:"syscall_floor_us_per_conn"`
	// Components times fixed steps of the phases, to explain them.
	Components Components `json:"components"`

	// WireBytes crossed the link (both ways, compressed and framed);
	// StateBytes is the queued connection data moved (source.Result.RawBytes).
	WireBytes  int64 `json:"wire_bytes"`
	StateBytes int64 `json:"state_bytes"`

	PeakRSS RSS  `json:"peak_rss_bytes"`
	Peer    Peer `json:"peer"`
	Env     Env  `json:"env"`
	// Errors lists everything that went wrong; empty in a clean run.
	Errors []string `json:"errors,omitempty"`
}

// Consistent returns the reasons r is not a complete, consistent report of
// a clean run: every connection committed and verified, no reset at the
// peer, distributions ordered, bytes counted. It checks no time.
func (r *Report) Consistent() []string {
	var bad []string
	add := func(format string, args ...any) { bad = append(bad, fmt.Sprintf(format, args...)) }
	for _, e := range r.Errors {
		add("error: %s", e)
	}
	if r.Committed != r.Conns || r.Conns == 0 {
		add("%d of %d connections committed", r.Committed, r.Conns)
	}
	if r.Peer.Verified != r.Conns {
		add("%d of %d connections verified both ways", r.Peer.Verified, r.Conns)
	}
	if r.Peer.Resets != 0 {
		add("the peer counted %d resets", r.Peer.Resets)
	}
	if r.Held > 0 && r.Premade == 0 {
		add("%d connections held, none restored on a socket made before the freeze", r.Held)
	}
	c := r.Components
	dists := map[string]*Dist{"freeze": r.Freeze, "freeze excluding switch": r.FreezeExclSwitch,
		"inspect": r.Inspect, "dump": r.Dump, "restore": r.Restore, "floor dump": r.Floor.Dump, "floor restore": r.Floor.Restore,
		"lock table": c.LockTable, "lock batch": c.LockBatch, "unlock batch": c.UnlockBatch,
		"journal write": c.JournalSmall, "journal write with connections": c.JournalConns, "packet socket close": c.PacketClose}
	if r.StreamConns > 0 {
		if r.Stall == nil {
			add("streaming connections but no stall measured")
		} else {
			dists["stall arrival"], dists["stall acked"], dists["stall received"] = r.Stall.Arrival, r.Stall.Acked, r.Stall.Received
		}
	}
	for name, d := range dists {
		switch {
		case d == nil:
			add("no %s distribution", name)
		case !d.ordered():
			add("%s distribution out of order: %+v", name, *d)
		case d.Min < 0:
			add("%s distribution negative: %+v", name, *d)
		}
	}
	if len(r.Phases) == 0 {
		add("no phases")
	}
	if r.WireBytes <= 0 || r.StateBytes < 0 || r.QueueBytes > 0 && r.StateBytes <= 0 {
		add("bytes: wire %d, state %d", r.WireBytes, r.StateBytes)
	}
	if r.PeakRSS.Source <= 0 || r.PeakRSS.Target <= 0 {
		add("peak RSS not measured: %+v", r.PeakRSS)
	}
	return bad
}

// WriteTable prints r for a person.
func (r *Report) WriteTable(w io.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	kind := "idle"
	if r.QueueBytes > 0 {
		kind = fmt.Sprintf("%s queued each way", size(int64(r.QueueBytes)))
	}
	p("tcpmigrate bench: %d connections, %s", r.Conns, kind)
	if r.StreamConns > 0 {
		p(", %d streaming (16 KiB every %s)", r.StreamConns, time.Duration(r.StreamIntervalUS*1e3))
	}
	p("\n  %d/%d committed (%s), %d held with a zero window, %d pre-copied (%d of them confirmed after the lock), %d restored on sockets made before the freeze, %d handed back; load %.2f before, %.2f after; %s, %d CPUs\n\n",
		r.Committed, r.Conns, r.State, r.Held, r.Precopied, r.Confirmed, r.Premade, r.HandedBack, r.LoadBefore(), r.Env.LoadAfter[0], r.Env.Kernel, r.Env.CPUs)
	p("  %-34s %10s %10s %10s %10s\n", "µs", "min", "p50", "p99", "max")
	row := func(name string, d *Dist) {
		if d == nil {
			p("  %-34s %10s\n", name, "-")
			return
		}
		p("  %-34s %10.1f %10.1f %10.1f %10.1f\n", name, d.Min, d.P50, d.P99, d.Max)
	}
	row("freeze per connection", r.Freeze)
	row("  excluding the address switch", r.FreezeExclSwitch)
	if r.Stall != nil {
		row("peer stall: arrival gap", r.Stall.Arrival)
		row("peer stall: acked gap", r.Stall.Acked)
		row("peer stall: received gap", r.Stall.Received)
	}
	p("  per connection, %d timed one by one:\n", r.CalibrationConns)
	row("  inspect (repair.Inspect)", r.Inspect)
	row("  dump (repair.Capture)", r.Dump)
	row("  restore (repair.Restore)", r.Restore)
	row("  syscall floor: dump", r.Floor.Dump)
	row("  syscall floor: restore", r.Floor.Restore)
	c := r.Components
	p("  components (lock batches of %d tuples, journal record of %d connections):\n", r.CalibrationConns, r.Conns)
	row("  lock table (firewall.New)", c.LockTable)
	row("  lock, one batch", c.LockBatch)
	row("  unlock, one batch", c.UnlockBatch)
	row("  journal write, no connections", c.JournalSmall)
	row("  journal write, every connection", c.JournalConns)
	row("  close of an ARP packet socket", c.PacketClose)
	var ph []string
	for _, x := range r.Phases {
		ph = append(ph, fmt.Sprintf("%s %.0f", x.Name, x.US))
	}
	p("\n  phases (µs): %s; total %.0f\n", strings.Join(ph, ", "), r.TotalUS)
	p("  workload paused %.0f µs (hand-over to the source agent %.0f µs)\n", r.PauseUS, r.HandoffUS)
	ratio := 0.0
	if r.StateBytes > 0 {
		ratio = float64(r.WireBytes) / float64(r.StateBytes)
	}
	p("  bytes: state %s, wire %s (%.3f× state)\n", size(r.StateBytes), size(r.WireBytes), ratio)
	p("  peak RSS: source agent %s, target agent %s (bench %s, peer %s)\n",
		size(r.PeakRSS.Source), size(r.PeakRSS.Target), size(r.PeakRSS.Bench), size(r.PeakRSS.Peer))
	p("  peer: %d resets; %d/%d connections verified both ways; %s to it, %s from it\n",
		r.Peer.Resets, r.Peer.Verified, r.Conns, size(r.Peer.ToPeer), size(r.Peer.FromPeer))
	p("  peer's sending: %d segments retransmitted, %d retransmission timeouts, %d tail loss probes\n",
		r.Peer.Retransmits, r.Peer.Timeouts, r.Peer.LossProbes)
	for _, e := range r.Errors {
		p("  error: %s\n", e)
	}
}

// LoadBefore returns the one-minute load average when the run started.
func (r *Report) LoadBefore() float64 { return r.Env.LoadBefore[0] }

func size(n int64) string {
	switch {
	case n >= 10<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 10<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
