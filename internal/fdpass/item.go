package fdpass

import (
	"net/netip"
	"os"
)

// Item is one socket with its metadata.
type Item struct {
	// File is the socket. Items returned by a receive own their File and the
	// caller must close it (CloseItems). Items given to a send stay the
	// caller's: a send does not close them, and the peer gets descriptors of
	// its own for the same sockets.
	File *os.File
	// Local and Remote are the connection's addresses as the sender states
	// them; the receiver does not check them against the socket. Either may
	// be the zero AddrPort when the sender did not say.
	Local, Remote netip.AddrPort
	// State is the application's opaque state for the connection: at most
	// the receiver's Limits.MaxState bytes (and never more than MaxStateLen).
	// A received empty state is nil.
	State []byte
	// ID names the connection, such as a migration's connection ID. The IDs
	// of one message are distinct.
	ID uint64
	// Name, if not empty, says what the socket is, in the descriptor naming
	// scheme of LISTEN_FDNAMES (docs/handoff-socket.md): a connection, a
	// listener, or a connection pending on a listener. A name that
	// LISTEN_FDNAMES could carry (activation.ValidName: at most
	// activation.MaxNameLen bytes of [A-Za-z0-9._-]).
	Name string
}

// CloseItems closes the files of items and returns the first error.
func CloseItems(items []Item) error {
	var first error
	for i := range items {
		if items[i].File == nil {
			continue
		}
		if err := items[i].File.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Message is one message received by Conn.Receive.
type Message struct {
	// Kind is KindSockets, KindHandBack, KindCommitted, KindAck, KindPause
	// or KindPaused.
	Kind Kind
	// Live says that the sender of a KindSockets message keeps serving its
	// sockets until it is sent a KindPause (Conn.SendSocketsLive).
	Live bool
	// Items are the sockets of KindSockets and KindHandBack, in the order
	// they were sent, and the records of KindPaused (no File).
	Items []Item
	// IDs are the connection IDs of KindCommitted, KindAck and KindPause.
	IDs []uint64
}
