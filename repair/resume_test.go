package repair

import (
	"bytes"
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// TestResumeLostSegmentIsLive takes a connection out of repair mode through
// Restorer.Resume with an Injector that can no longer send (closed), in the
// two cases where Resume sends a crafted segment after leaving repair mode:
// the kick of a held connection and the probe of a half-closed one. The
// lost segment is not fatal: Resume's error, if any, matches
// ErrResumedLive, the socket is out of repair mode, and data still flows.
func TestResumeLostSegmentIsLive(t *testing.T) {
	for _, tc := range []struct {
		name      string
		halfClose bool // the peer shut its side: CLOSE_WAIT, probed on resume
		want      State
	}{
		{"held-kick", false, StateEstablished},
		{"close-wait-probe", true, StateCloseWait},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := solo(t)
			cl, sv := pair(t, ns, 0, nil, nil)
			if tc.halfClose {
				if err := unix.Shutdown(sv, unix.SHUT_WR); err != nil {
					t.Fatal(err)
				}
				waitTCPState(t, cl, StateCloseWait)
			}
			var s Snapshot
			var in *Injector
			err := ns.Do(func() error {
				if err := Dump(cl, &s); err != nil {
					return err
				}
				var err error
				in, err = NewInjector(0)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if s.State != tc.want {
				t.Fatalf("dumped %s, want %s", s.State, tc.want)
			}
			if !tc.halfClose && !s.MarkHeld() {
				t.Fatal("MarkHeld refused an established snapshot")
			}
			in.Close() // every Send fails from now on
			r := Restorer{Injector: in}
			err = ns.Do(func() error { return r.Resume(cl, &s) })
			if err != nil && !errors.Is(err, ErrResumedLive) {
				t.Fatalf("Resume = %v, want nil or an error matching ErrResumedLive", err)
			}
			if err == nil || !errors.Is(err, unix.EBADF) {
				t.Fatalf("Resume = %v, want the injector's failure reported (EBADF)", err)
			}
			if v, gerr := unix.GetsockoptInt(cl, unix.IPPROTO_TCP, unix.TCP_REPAIR); gerr != nil || v != 0 {
				t.Fatalf("TCP_REPAIR = %d (%v) after Resume, want 0", v, gerr)
			}
			// Live: what the resumed end writes reaches its peer.
			msg := []byte("still here")
			if _, err := unix.Write(cl, msg); err != nil {
				t.Fatalf("write on the resumed socket: %v", err)
			}
			got := make([]byte, len(msg))
			if err := unix.SetsockoptTimeval(sv, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 5}); err != nil {
				t.Fatal(err)
			}
			n, err := unix.Read(sv, got)
			if err != nil || !bytes.Equal(got[:n], msg) {
				t.Fatalf("peer read %q, %v; want %q", got[:n], err, msg)
			}
		})
	}
}
