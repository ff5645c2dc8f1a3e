package transport

import (
	"crypto/tls"
	"crypto/x509"
	"net"
)

// PeerInfo is what a side knows of its peer when Config.VerifyPeer runs:
// the TLS handshake is done (the peer's certificate chain verified against
// the configured CAs) and the peer's Hello has arrived, but nothing of the
// link has been accepted yet.
type PeerInfo struct {
	// Addr is the peer's network address.
	Addr net.Addr
	// Certificate is the peer's leaf certificate; nil on an insecure link.
	Certificate *x509.Certificate
	// Hello is the peer's Hello. The callee must not modify it.
	Hello *Hello
	// Dialed is true when this side dialed the peer (this side is the
	// client), false when it accepted the link.
	Dialed bool
}

// verifyPeer runs Config.VerifyPeer, if any, on the peer of conn (a
// *tls.Conn unless the link is insecure) and returns the Reject that
// refuses it, or nil.
func (s *settings) verifyPeer(conn net.Conn, peer *Hello, dialed bool) *Reject {
	if s.cfg.VerifyPeer == nil {
		return nil
	}
	info := &PeerInfo{Addr: conn.RemoteAddr(), Hello: peer, Dialed: dialed}
	if tc, ok := conn.(*tls.Conn); ok {
		if certs := tc.ConnectionState().PeerCertificates; len(certs) > 0 {
			info.Certificate = certs[0]
		}
	}
	if err := s.cfg.VerifyPeer(info); err != nil {
		return &Reject{Code: RejectPolicy, Reason: err.Error()}
	}
	return nil
}
