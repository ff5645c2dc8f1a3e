package transport

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestVerifyPeer checks the VerifyPeer hook over every kind of connection:
// each side sees the other's certificate (TLS) or none (plaintext), its
// Hello and address; a refusal by either side fails both with a
// *HandshakeError of code RejectPolicy carrying the reason, Remote on the
// refused side.
func TestVerifyPeer(t *testing.T) {
	forKinds(t, func(t *testing.T, k kind) {
		for _, refuser := range []string{"none", "server", "client"} {
			t.Run(refuser, func(t *testing.T) {
				ccfg, scfg := configs(t, k)
				ccfg.Software, scfg.Software = "the-source", "the-target"
				var seenByServer, seenByClient *PeerInfo
				scfg.VerifyPeer = func(p *PeerInfo) error {
					seenByServer = p
					if refuser == "server" {
						return errors.New("no role source in the certificate")
					}
					return nil
				}
				ccfg.VerifyPeer = func(p *PeerInfo) error {
					seenByClient = p
					if refuser == "client" {
						return fmt.Errorf("no role target in the certificate")
					}
					return nil
				}
				cl, sv, cerr, serr := handshakePair(t, k, ccfg, scfg)
				if cl != nil {
					defer cl.Close()
				}
				if sv != nil {
					defer sv.Close()
				}
				if seenByServer == nil || seenByServer.Hello.Software != "the-source" || seenByServer.Dialed || seenByServer.Addr == nil {
					t.Fatalf("server's hook saw %+v", seenByServer)
				}
				if (seenByServer.Certificate != nil) != (k == kindTLS) {
					t.Errorf("server's hook: certificate %v on a %s link", seenByServer.Certificate != nil, k)
				}
				if k == kindTLS && seenByServer.Certificate.Subject.CommonName != "source" {
					t.Errorf("server's hook saw certificate %s", seenByServer.Certificate.Subject)
				}
				if refuser == "server" {
					// The client never gets to judge the server.
					checkRefused(t, "client", cerr, true, "no role source")
					checkRefused(t, "server", serr, false, "no role source")
					return
				}
				if seenByClient == nil || seenByClient.Hello.Software != "the-target" || !seenByClient.Dialed {
					t.Fatalf("client's hook saw %+v", seenByClient)
				}
				if k == kindTLS && (seenByClient.Certificate == nil || seenByClient.Certificate.Subject.CommonName != "target") {
					t.Errorf("client's hook saw certificate %v", seenByClient.Certificate)
				}
				if refuser == "client" {
					checkRefused(t, "client", cerr, false, "no role target")
					checkRefused(t, "server", serr, true, "no role target")
					return
				}
				if cerr != nil || serr != nil {
					t.Fatalf("handshake: client %v, server %v", cerr, serr)
				}
			})
		}
	})
}

func checkRefused(t *testing.T, side string, err error, remote bool, reason string) {
	t.Helper()
	var he *HandshakeError
	if !errors.As(err, &he) {
		t.Fatalf("%s: %v, want a *HandshakeError", side, err)
	}
	if he.Code != RejectPolicy || he.Remote != remote || !strings.Contains(he.Reason, reason) {
		t.Errorf("%s: %+v, want code policy, remote %v, reason with %q", side, he, remote, reason)
	}
	if !errors.Is(err, ErrHandshake) {
		t.Errorf("%s: %v does not match ErrHandshake", side, err)
	}
}
