package procsock

import (
	"errors"
	"slices"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// Inspect asks repair.Inspect about every socket of socks that is still
// taken (after List and Filter) and returns a copy of socks in which those
// that repair refuses carry ReasonRepair and the refusal (such as
// "repair: urgent-data", for urgent data pending, or "repair: ulp (tls)").
// It duplicates their descriptors, as DupSockets does, runs the checks in
// the process's network namespace and closes the copies again; nothing on
// the sockets changes.
//
// The answer is a preview: until the process is frozen it may still change
// a socket (set an option, receive urgent data), and send --pid inspects
// again after the freeze.
func Inspect(pid int, socks []Socket) ([]Socket, error) {
	out := slices.Clone(socks)
	var idx []int
	for i := range out {
		if out[i].Verdict.Take {
			idx = append(idx, i)
		}
	}
	if len(idx) == 0 {
		return out, nil
	}
	taken := make([]Socket, len(idx))
	for j, i := range idx {
		taken[j] = out[i]
	}
	files, err := DupSockets(pid, taken)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	err = InNetNS(pid, func() error {
		var snap repair.Snapshot
		var in repair.Inspector // one sock_diag dump for all
		for j, f := range files {
			err := in.Inspect(int(f.Fd()), &snap)
			var ue *repair.UnsupportedError
			switch {
			case errors.As(err, &ue):
				text := "repair: " + ue.Reason.String()
				if ue.Detail != "" {
					text += " (" + ue.Detail + ")"
				}
				out[idx[j]].Verdict = Verdict{Reason: ReasonRepair, Text: text}
			case err != nil:
				return opErr("repair.Inspect", pid, taken[j].FD(), err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
