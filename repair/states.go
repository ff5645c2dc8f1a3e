package repair

// What each TCP state means for a migration (REPAIR-NOTES 3.3, 3.4, 5.1).

// Migratable reports whether Capture accepts a connection in state s:
// ESTABLISHED, SYN_SENT and the half-closed states FIN_WAIT1, FIN_WAIT2,
// CLOSING, CLOSE_WAIT, LAST_ACK and CLOSE (libsoccr's list). LISTEN cannot
// enter repair; SYN_RECV, NEW_SYN_RECV and TIME_WAIT have no descriptor.
func (s State) Migratable() bool {
	switch s {
	case StateEstablished, StateSynSent, StateFinWait1, StateFinWait2,
		StateClosing, StateCloseWait, StateLastAck, StateClose:
		return true
	}
	return false
}

// HalfClosed reports whether s is one of the states in which at least one
// FIN was sent or received: FIN_WAIT1, FIN_WAIT2, CLOSING, CLOSE_WAIT,
// LAST_ACK and CLOSE. Restoring them needs kernel support (FeatHalfClosed).
func (s State) HalfClosed() bool {
	return s.peerFin() || s.ourFin()
}

// NeedsInjection reports whether restoring a connection in state s needs
// segments crafted as if from the peer (the peer's FIN, or the peer's
// acknowledgement of ours), and so a Restorer with an Injector.
func (s State) NeedsInjection() bool {
	switch s {
	case StateFinWait2, StateClosing, StateCloseWait, StateLastAck, StateClose:
		return true
	}
	return false
}

// peerFin reports whether the peer's FIN has been received in state s: it
// is counted in rcv_nxt (RecvSeq) but not in the receive queue.
func (s State) peerFin() bool {
	switch s {
	case StateCloseWait, StateLastAck, StateClosing, StateClose:
		return true
	}
	return false
}

// ourFin reports whether our FIN has been queued in state s: it is counted
// in write_seq (SendSeq) and in the queue ioctls, but carries no byte of
// the send queue.
func (s State) ourFin() bool {
	switch s {
	case StateFinWait1, StateFinWait2, StateClosing, StateLastAck, StateClose:
		return true
	}
	return false
}

// queueLengthsFor turns the raw SIOCOUTQ and SIOCOUTQNSD values of a socket
// in state st into byte counts of the send queue (REPAIR-NOTES 3.4): a
// CLOSE socket keeps no send data (a reset connection must not resurrect
// what it could never send), and a queued FIN takes a sequence number but
// no byte.
func queueLengthsFor(st State, outq, unsq int32) (int32, int32) {
	switch {
	case st == StateClose:
		return 0, 0
	case st.ourFin():
		if outq > 0 {
			outq--
		}
		if unsq > 0 {
			unsq--
		}
	}
	return outq, unsq
}

// finOffsets returns how far the restored queues start below the saved
// sequence numbers because of a FIN that is re-created later: one on the
// receive side when the peer's FIN was received, one on the send side
// when ours was queued (REPAIR-NOTES 5.1).
func finOffsets(st State) (recv, send uint32) {
	if st.peerFin() {
		recv = 1
	}
	if st.ourFin() {
		send = 1
	}
	return recv, send
}
