package source

import "strconv"

// State is the source's position in the handoff (docs/handoff.md). It only
// moves forward, through the transitions documented there.
type State uint8

// The states of the source.
const (
	StateInit       State = iota // nothing done yet
	StateConnected               // the link is up and the handshake done
	StateLocked                  // eligible connections locked on the source
	StatePreparing               // capturing and streaming snapshots, collecting verdicts
	StatePrepared                // every verdict is in; refused connections rolled back
	StateSwitching               // the switch is about to move the identity (journal only: recovery treats it as switched)
	StateSwitched                // the network identity has moved
	StateCommitting              // Commit sent: in doubt until Committed arrives
	StateCommitted               // the target owns the connections; source copies discarded
	StateRolledBack              // aborted before Commit: the source owns every connection
	StateInDoubt                 // Commit sent, and the outcome could not be learnt
)

var stateNames = [...]string{
	StateInit: "init", StateConnected: "connected", StateLocked: "locked",
	StatePreparing: "preparing", StatePrepared: "prepared", StateSwitching: "switching", StateSwitched: "switched",
	StateCommitting: "committing", StateCommitted: "committed", StateRolledBack: "rolled-back",
	StateInDoubt: "in-doubt",
}

// String returns the state's name as docs/handoff.md spells it.
func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "state(" + strconv.Itoa(int(s)) + ")"
}

// Step names a point of the handoff where Config.Fault can inject a failure.
type Step string

// The steps, in order.
const (
	StepDial      Step = "dial"      // before the link is dialled
	StepListeners Step = "listeners" // after the listeners' SYNs are locked and their accept queues taken (with no listener: before inspect)
	StepInspect   Step = "inspect"   // before the connections are inspected
	StepLock      Step = "lock"      // before the source lock
	StepPrecopied Step = "precopied" // after the pre-copies are restored on the target, before the first lock
	StepPrepare   Step = "prepare"   // before Prepare is sent
	StepCapture   Step = "capture"   // before the first capture
	StepVerdicts  Step = "verdicts"  // after the snapshots are sent, before Prepared is awaited
	StepSwitch    Step = "switch"    // before the switch hook
	StepSwitched  Step = "switched"  // after the switch hook, before the target is told
	StepCommit    Step = "commit"    // before Commit is sent
	StepFinish    Step = "finish"    // after Committed, before the source copies are discarded
)

// Steps lists every fault-injection step in order.
var Steps = []Step{StepDial, StepListeners, StepInspect, StepLock, StepPrecopied, StepPrepare, StepCapture, StepVerdicts, StepSwitch, StepSwitched, StepCommit, StepFinish}

// Outcome is what became of one connection.
type Outcome string

// The outcomes of a connection.
const (
	Committed  Outcome = "committed"   // the target owns it
	RolledBack Outcome = "rolled_back" // it carries on at the source
	Failed     Outcome = "failed"      // neither: see the error (and recover)
)
