package transport

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/tcpmigrate/tcpmigrate/repair"
)

// Limits bound what a side accepts from its peer. Each side enforces its own
// on receive, before allocating, and announces them in its Hello so that the
// peer can refuse to send what would be refused. A zero member takes its
// default (the Default… constants).
type Limits struct {
	// MaxFrame bounds the length of a control frame (a handoff message).
	MaxFrame uint32
	// MaxSnapshot bounds the decoded size of one snapshot record: its queues
	// and every other field.
	MaxSnapshot uint32
	// MaxMigration bounds the decoded bytes of all snapshot records received
	// over one link.
	MaxMigration uint64
	// MaxConnections bounds the number of snapshot records received over one
	// link; connection indices must also be below it.
	MaxConnections uint32
}

// Compression says when a side compresses the chunks of the snapshot
// streams it sends (each chunk is raw or zstd; see docs/protocol.md).
type Compression uint8

// The compression modes.
const (
	// CompressAuto compresses a chunk when that is faster than sending it
	// raw: when the compressor outruns the link and the data compresses.
	// It measures both as it goes, so a fast link (loopback, or a network
	// faster than one core's zstd) gets raw chunks and a slower one
	// compressed chunks.
	CompressAuto Compression = iota
	// CompressAlways compresses every chunk (sent raw only when it does
	// not shrink).
	CompressAlways
	// CompressNever sends every chunk raw, and asks the peer to do the same.
	CompressNever
)

// DefaultLimits returns the limits used for zero members of Limits.
func DefaultLimits() Limits {
	return Limits{
		MaxFrame:       DefaultMaxFrame,
		MaxSnapshot:    DefaultMaxSnapshot,
		MaxMigration:   DefaultMaxMigration,
		MaxConnections: DefaultMaxConnections,
	}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxFrame == 0 {
		l.MaxFrame = d.MaxFrame
	}
	if l.MaxSnapshot == 0 {
		l.MaxSnapshot = d.MaxSnapshot
	}
	if l.MaxMigration == 0 {
		l.MaxMigration = d.MaxMigration
	}
	if l.MaxConnections == 0 {
		l.MaxConnections = d.MaxConnections
	}
	return l
}

// Config configures one side of a link. The same Config serves Dial and
// Listen. A Config must not be modified once passed to this package.
type Config struct {
	// TLS holds the certificate this side presents and the CA pools it
	// trusts: RootCAs to verify a server, ClientCAs to verify a client.
	// Whatever it says, this package requires TLS 1.3, and a server always
	// requires and verifies a client certificate. It must be nil when
	// Insecure is set.
	TLS *tls.Config
	// Insecure runs the link in plaintext, without authentication. It must be
	// asked for explicitly (the --insecure flag); a plaintext peer is never
	// accepted by a side that has TLS.
	Insecure bool

	// Capabilities are this side's kernel capabilities (from repair.Probe),
	// sent in the Hello.
	Capabilities repair.Capabilities
	// Require lists kernel features the peer must have; the handshake fails
	// with ErrMissingFeature on both sides when one is missing.
	Require repair.Features
	// Compression says when this side compresses the snapshot streams it
	// sends. CompressNever also asks the peer not to compress what it sends:
	// the link then runs uncompressed both ways.
	Compression Compression
	// Limits are this side's receive limits.
	Limits Limits

	// HandshakeTimeout bounds the TLS handshake and the Hello exchange.
	// Zero means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// KeepAliveInterval is how often a ping is sent when the link is idle;
	// KeepAliveTimeout is how long a ping answer or a write may take. A dead
	// peer is noticed within about their sum. Zero means the defaults.
	KeepAliveInterval, KeepAliveTimeout time.Duration

	// Software names this program in the Hello, for the peer's reports.
	Software string

	// VerifyPeer, if set, is called on both sides once the peer's Hello has
	// arrived, with the peer's verified certificate (see PeerInfo). An
	// error refuses the peer: it is sent a Reject with code RejectPolicy
	// and the error's text as the reason, and both sides fail with a
	// *HandshakeError of that code. Agents use it to check the peer's role.
	VerifyPeer func(*PeerInfo) error
}

// LoadConfig returns a Config for mutual TLS from three PEM files: this
// side's certificate (chain), its private key, and the CA certificates that
// sign the peers' certificates (trusted for both directions).
func LoadConfig(certFile, keyFile, caFile string) (*Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, opError("load config", err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, opError("load config", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, opError("load config", fmt.Errorf("%w: no CA certificate in %s", ErrConfig, caFile))
	}
	return NewConfig(&tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ClientCAs:    pool,
		MinVersion:   tls.VersionTLS13,
	}), nil
}

// NewConfig returns a Config that uses tlsConfig (see Config.TLS). The
// tls.Config is cloned when a link is made, never modified.
func NewConfig(tlsConfig *tls.Config) *Config {
	return &Config{TLS: tlsConfig}
}

// InsecureConfig returns a Config for a plaintext, unauthenticated link. Use
// it only when the user asked for it by name.
func InsecureConfig() *Config {
	return &Config{Insecure: true}
}

// settings is a Config with its defaults filled in and checked.
type settings struct {
	cfg                  *Config
	limits               Limits
	handshakeTimeout     time.Duration
	keepAlive, kaTimeout time.Duration
}

func (c *Config) settings() (*settings, error) {
	if c == nil {
		return nil, ErrNoTLS
	}
	if c.TLS == nil && !c.Insecure {
		return nil, ErrNoTLS
	}
	if c.TLS != nil && c.Insecure {
		return nil, fmt.Errorf("%w: both TLS and Insecure are set", ErrConfig)
	}
	if c.TLS != nil && len(c.TLS.Certificates) == 0 && c.TLS.GetCertificate == nil && c.TLS.GetClientCertificate == nil {
		return nil, fmt.Errorf("%w: TLS has no certificate (mutual authentication needs one on each side)", ErrConfig)
	}
	s := &settings{cfg: c, limits: c.Limits.withDefaults(),
		handshakeTimeout: c.HandshakeTimeout, keepAlive: c.KeepAliveInterval, kaTimeout: c.KeepAliveTimeout}
	if c.Compression > CompressNever {
		return nil, fmt.Errorf("%w: unknown Compression %d", ErrConfig, c.Compression)
	}
	if s.handshakeTimeout < 0 || s.keepAlive < 0 || s.kaTimeout < 0 {
		return nil, fmt.Errorf("%w: negative timeout", ErrConfig)
	}
	if s.handshakeTimeout == 0 {
		s.handshakeTimeout = DefaultHandshakeTimeout
	}
	if s.keepAlive == 0 {
		s.keepAlive = DefaultKeepAliveInterval
	}
	if s.kaTimeout == 0 {
		s.kaTimeout = DefaultKeepAliveTimeout
	}
	return s, nil
}

// hello returns this side's Hello.
func (s *settings) hello() *Hello {
	c := s.cfg
	h := &Hello{
		Features:   c.Capabilities.Features,
		Kernel:     c.Capabilities.Kernel,
		Congestion: c.Capabilities.Congestion,
		Codecs:     1 << CodecNone,
		Limits:     s.limits,
		Software:   c.Software,
	}
	if c.Compression != CompressNever {
		h.Codecs |= 1 << CodecZstd
	}
	if h.Software == "" {
		h.Software = "tcpmigrate"
	}
	return h
}

// clientTLS returns the tls.Config for the dialing side; serverName is the
// host the peer's certificate must name when TLS.ServerName is empty.
func (s *settings) clientTLS(serverName string) *tls.Config {
	t := s.cfg.TLS.Clone()
	t.MinVersion = tls.VersionTLS13
	if t.ServerName == "" {
		t.ServerName = serverName
	}
	if t.GetClientCertificate == nil && len(t.Certificates) > 0 {
		// crypto/tls sends no certificate at all when ours is not signed by
		// a CA the server names; send it anyway, so that the server can say
		// what is wrong with it.
		cert := t.Certificates[0]
		t.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	}
	return t
}

// serverTLS returns the tls.Config for the accepting side: TLS 1.3, a client
// certificate required and verified, no session tickets (a link is never
// resumed, and tickets written after the handshake would cross the first
// Hello on an unbuffered connection).
func (s *settings) serverTLS() *tls.Config {
	t := s.cfg.TLS.Clone()
	t.MinVersion = tls.VersionTLS13
	switch {
	case t.ClientAuth == tls.RequireAnyClientCert && (t.VerifyPeerCertificate != nil || t.VerifyConnection != nil):
		// The caller verifies certificates itself (pinning, say).
	default:
		t.ClientAuth = tls.RequireAndVerifyClientCert
	}
	t.SessionTicketsDisabled = true
	return t
}

// hostOf returns the host part of addr, or addr if it has no port.
func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}
