package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/addrmove"
	"github.com/tcpmigrate/tcpmigrate/internal/fdpass"
	"github.com/tcpmigrate/tcpmigrate/source"
	"github.com/tcpmigrate/tcpmigrate/target"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// sourceConfig configures the source agent's child. It runs inside the
// source host's namespace.
type sourceConfig struct {
	// To is the target agent's address.
	To string `json:"to"`
	// Handoff is the unix socket path where the workload hands its sockets
	// over (as to `send --handoff`).
	Handoff string `json:"handoff"`
	// Release is the service address released at the switch, on Dev.
	Release    string `json:"release"`
	Dev        string `json:"dev"`
	JournalDir string `json:"journal_dir"`
	// NoHold turns the zero-window hold off (source.Config.NoHold).
	NoHold bool `json:"no_hold,omitempty"`
	// NoPrecopy turns the pre-copies off (source.Config.NoPrecopy).
	NoPrecopy bool `json:"no_precopy,omitempty"`
}

// sourceResult is what the source agent's child reports.
type sourceResult struct {
	event
	State     string          `json:"state"`
	Freeze    []time.Duration `json:"freeze"` // by connection, in hand-over order
	Outcomes  map[string]int  `json:"outcomes"`
	ConnErrs  []string        `json:"conn_errors,omitempty"` // the first few
	Phases    []source.Phase  `json:"phases"`
	RawBytes  int64           `json:"raw_bytes"`
	WireBytes int64           `json:"wire_bytes"`
	VmHWM     int64           `json:"vm_hwm"`
	Received  time.Duration   `json:"received"` // from accepting the handoff to holding every socket
	// HandedBack counts the sockets that rolled back and went back to the
	// workload.
	HandedBack int `json:"handed_back"`
	// Held is source.Result.Held.
	Held int `json:"held"`
	// Precopied and Confirmed are source.Result's.
	Precopied int `json:"precopied"`
	Confirmed int `json:"confirmed"`
}

// runSource takes the workload's sockets over the handoff socket, migrates
// them with source.Migrate and reports the Result.
func runSource(ctx context.Context, cfg *childConfig, enc *json.Encoder) error {
	sc := cfg.Source
	if err := raiseNoFile(0); err != nil {
		return err
	}
	tcfg, err := linkConfig(cfg.TLS)
	if err != nil {
		return err
	}
	svc, err := netip.ParsePrefix(sc.Release)
	if err != nil {
		return fmt.Errorf("bench: release address: %w", err)
	}
	am := addrmove.Config{Prefix: svc, Dev: sc.Dev}
	scfg := source.Config{
		To: sc.To, Transport: tcfg, JournalDir: sc.JournalDir, Log: childLog(),
		Switch:      func(ctx context.Context) error { return addrmove.Release(ctx, am) },
		Unswitch:    func(ctx context.Context) error { return addrmove.Claim(ctx, am) },
		SwitchAddrs: []netip.Prefix{svc},
		NoHold:      sc.NoHold,
		NoPrecopy:   sc.NoPrecopy,
	}
	ln, err := fdpass.Listen(sc.Handoff, fdpass.Policy{Limits: fdpass.Limits{MaxBatch: fdpass.MaxBatchLimit}})
	if err != nil {
		return err
	}
	defer ln.Close()
	if err := enc.Encode(event{Event: "ready"}); err != nil {
		return err
	}
	conn, err := ln.Accept()
	if err != nil {
		return err
	}
	defer conn.Close()
	start := time.Now()
	msg, err := conn.RecvSocketsMessage()
	if err != nil {
		return err
	}
	items := msg.Items
	received := time.Since(start)
	if msg.Live {
		// As `send --handoff` does for a live program.
		scfg.Pause = func(ctx context.Context, idx []int) ([][]byte, error) {
			return conn.PauseItems(ctx, items, idx, fdpass.DefaultPauseTimeout)
		}
		scfg.PauseWaves = true // the workload answers every PAUSE
	}
	conns := make([]source.Conn, len(items))
	for i, it := range items {
		conns[i] = source.Conn{File: it.File, OwnerFD: -1}
	}
	res, merr := source.Migrate(ctx, scfg, conns)
	// Migrate closed the committed sockets; what rolled back goes back to
	// the workload, as `send --handoff` does.
	var back []fdpass.Item
	for i, cr := range res.Conns {
		if cr.Outcome != source.Committed {
			back = append(back, items[i])
		}
	}
	var herr error
	if len(back) > 0 {
		herr = conn.HandBack(back)
		fdpass.CloseItems(back)
	}
	out := sourceResult{event: event{Event: "result"}, State: res.State.String(), Outcomes: map[string]int{},
		Phases: res.Phases, RawBytes: res.RawBytes, WireBytes: res.WireBytes, Received: received, Held: res.Held,
		Precopied: res.Precopied, Confirmed: res.Confirmed}
	for _, cr := range res.Conns {
		out.Freeze = append(out.Freeze, cr.Freeze)
		out.Outcomes[string(cr.Outcome)]++
		if cr.Err != nil && len(out.ConnErrs) < 5 {
			out.ConnErrs = append(out.ConnErrs, fmt.Sprintf("%s -> %s: %v", cr.Local, cr.Remote, cr.Err))
		}
	}
	if err := errors.Join(merr, herr); err != nil {
		out.Error = err.Error()
	}
	out.HandedBack = len(back)
	if out.VmHWM, err = vmHWM(); err != nil {
		return err
	}
	return enc.Encode(out)
}

// targetConfig configures the target agent's child. It runs inside the
// target host's namespace.
type targetConfig struct {
	Listen string   `json:"listen"`
	Allow  []string `json:"allow"`
	// Claim is the service address claimed at the switch, on Dev.
	Claim      string `json:"claim"`
	Dev        string `json:"dev"`
	JournalDir string `json:"journal_dir"`
	// Deliver is the unix socket path of the workload, where the committed
	// sockets are passed (as by `receive --deliver`).
	Deliver string `json:"deliver"`
	// OneDelivery turns delivery in waves off (target.Config.DeliverWaves).
	OneDelivery bool `json:"one_delivery,omitempty"`
}

// targetResult is what the target agent's child reports.
type targetResult struct {
	event
	State     string `json:"state"`
	Conns     int    `json:"conns"`
	Delivered int    `json:"delivered"`
	Premade   int    `json:"premade"`
	VmHWM     int64  `json:"vm_hwm"`
}

// runTarget serves one migration with target.Server and reports it. The
// committed sockets are passed to the workload from a goroutine, so that
// the target answers Committed as soon as it has resumed them: the freeze
// the source measures ends one message after the target's unlock, not
// after the delivery.
func runTarget(ctx context.Context, cfg *childConfig, enc *json.Encoder) error {
	tc := cfg.Target
	if err := raiseNoFile(0); err != nil {
		return err
	}
	tcfg, err := linkConfig(cfg.TLS)
	if err != nil {
		return err
	}
	svc, err := netip.ParsePrefix(tc.Claim)
	if err != nil {
		return fmt.Errorf("bench: claim address: %w", err)
	}
	am := addrmove.Config{Prefix: svc, Dev: tc.Dev}
	var wg sync.WaitGroup
	var derr errList
	tgt := target.Config{
		Transport: tcfg, JournalDir: tc.JournalDir, Log: childLog(),
		Claim:   func(ctx context.Context, _ []netip.Prefix) error { return addrmove.Claim(ctx, am) },
		Unclaim: func(ctx context.Context, _ []netip.Prefix) error { return addrmove.Release(ctx, am) },
		// The workload takes each delivery on a connection of its own,
		// as receive --deliver-waves would pass them.
		DeliverWaves: !tc.OneDelivery,
		Deliver: func(_ context.Context, conns []*target.Delivered) map[uint32]error {
			items := make([]fdpass.Item, len(conns))
			for i, d := range conns {
				items[i] = fdpass.Item{File: d.File, Local: d.Local, Remote: d.Remote, ID: uint64(d.Index)}
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				derr.add(deliver(tc.Deliver, items))
				fdpass.CloseItems(items)
			}()
			return nil
		},
	}
	for _, a := range tc.Allow {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			return fmt.Errorf("bench: allow: %w", err)
		}
		tgt.Allow = append(tgt.Allow, p)
	}
	srv, err := target.NewServer(tgt)
	if err != nil {
		return err
	}
	ln, err := transport.Listen(tc.Listen, tcfg)
	if err != nil {
		return err
	}
	defer ln.Close()
	if err := enc.Encode(event{Event: "ready"}); err != nil {
		return err
	}
	var rep *target.Report
	var serr error
	for {
		link, err := ln.Accept()
		if err != nil {
			return err
		}
		rep, serr = srv.ServeLink(ctx, link)
		if rep == nil || !rep.Query {
			break
		}
	}
	wg.Wait()
	out := targetResult{event: event{Event: "result"}}
	if rep != nil {
		out.State, out.Conns = rep.State.String(), len(rep.Conns)
		for _, c := range rep.Conns {
			if c.Delivered {
				out.Delivered++
			}
			if c.Premade {
				out.Premade++
			}
		}
	}
	if err := errors.Join(serr, derr.err()); err != nil {
		out.Error = err.Error()
	}
	if out.VmHWM, err = vmHWM(); err != nil {
		return err
	}
	return enc.Encode(out)
}

// deliver passes items to the workload listening at path and waits for its
// acknowledgement.
func deliver(path string, items []fdpass.Item) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// The default limits would refuse an acknowledgement of more than 4,096
	// connections (receive --deliver raises them too: docs/performance.md 6.6).
	conn, err := fdpass.Dial(ctx, path, fdpass.Limits{MaxBatch: fdpass.MaxBatchLimit})
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.SendSockets(items); err != nil {
		return err
	}
	_, err = conn.RecvAck()
	return err
}
