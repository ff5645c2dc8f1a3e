package target

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/tcpmigrate/tcpmigrate/internal/audit"
	"github.com/tcpmigrate/tcpmigrate/internal/certs"
	"github.com/tcpmigrate/tcpmigrate/internal/nsdo"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// guard is the part of a Server that decides whom and what it accepts and
// keeps the audit trail. It is set up once by NewServer and read-only
// afterwards, except for links (a semaphore).
type guard struct {
	pol   Policy // with defaults, Config.Allow merged in
	feats repair.Features
	audit *audit.Log
	log   *slog.Logger
	tcfg  *transport.Config // Config.Transport with the role check; nil without one
	links chan struct{}     // one token per link ServeListener serves
}

func newGuard(cfg *Config, log *slog.Logger) *guard {
	g := &guard{audit: cfg.Audit, log: log}
	g.pol = cfg.Policy.withDefaults()
	g.pol.Allow = slices.Concat(cfg.Policy.Allow, cfg.Allow)
	g.links = make(chan struct{}, g.pol.MaxLinks)
	if cfg.Transport != nil {
		g.feats = cfg.Transport.Capabilities.Features
		c := *cfg.Transport
		user := c.VerifyPeer
		c.VerifyPeer = func(p *transport.PeerInfo) error {
			if err := g.verify(p.Certificate, !c.Insecure); err != nil {
				return err
			}
			if user != nil {
				return user(p)
			}
			return nil
		}
		// A migration announcing more connections is refused anyway; the
		// link refuses records beyond it too, and says so in its Hello.
		if c.Limits.MaxConnections == 0 || c.Limits.MaxConnections > g.pol.MaxConnections {
			c.Limits.MaxConnections = g.pol.MaxConnections
		}
		g.tcfg = &c
	}
	if g.feats == 0 {
		// The features decide what the target refuses as unsupported:
		// learn them from the kernel when the configuration does not say.
		_ = nsdo.Do(cfg.NetNS, func() error {
			caps, err := repair.Probe()
			g.feats = caps.Features
			return err
		})
	}
	return g
}

// verify checks the certificate of a peer: it must name the source role
// unless the policy accepts any certificate. authenticated says whether the
// link is authenticated at all (an insecure link, asked for by name, has
// no certificate to check).
func (g *guard) verify(cert *x509.Certificate, authenticated bool) error {
	if g.pol.AnyCertificate || !authenticated {
		return nil
	}
	if cert == nil || !certs.HasRole(cert, certs.RoleSource) {
		subject := "none"
		if cert != nil {
			subject = cert.Subject.String()
		}
		return fmt.Errorf("%w: certificate %q names roles %v; a source needs one minted with the role source (URI SAN %s): see tcpmigrate certs --source-host",
			ErrRole, subject, certs.Roles(cert), certs.RoleSource.URI())
	}
	return nil
}

// TransportConfig returns the link configuration this server accepts links
// with: Config.Transport, plus a VerifyPeer that refuses a peer whose
// certificate lacks the source role during the handshake (a Reject with
// code policy that says why) and Limits.MaxConnections no larger than the
// policy's. Listeners made with it (transport.Listen) tell a refused
// source why before it has locked anything; ServeListener and Handshake
// use it. It returns nil when Config.Transport is nil.
func (s *Server) TransportConfig() *transport.Config {
	if s.guard.tcfg == nil {
		return nil
	}
	c := *s.guard.tcfg
	return &c
}

// Handshake runs the accepting side of the protocol on conn with the
// server's TransportConfig and returns the link; a refused handshake (a
// certificate without the source role, or any other failure) is written to
// the audit log with the peer's address and certificate. On error conn is
// closed.
func (s *Server) Handshake(ctx context.Context, conn net.Conn) (*transport.Link, error) {
	if s.guard.tcfg == nil {
		conn.Close()
		return nil, errors.New("target: handshake: the server has no transport configuration")
	}
	cfg := *s.guard.tcfg
	// The hook runs within transport.Server, on this goroutine.
	var seen *transport.PeerInfo
	verify := cfg.VerifyPeer
	cfg.VerifyPeer = func(p *transport.PeerInfo) error {
		seen = p
		return verify(p)
	}
	addr := conn.RemoteAddr()
	link, err := transport.Server(ctx, conn, &cfg)
	if err != nil {
		rec := &audit.Record{Event: audit.EventHandshake, Outcome: audit.OutcomeRefused, Reason: err.Error(),
			Peer: audit.Peer{Addr: addrString(addr)}}
		if seen != nil {
			rec.Peer = peerOf(seen.Addr, seen.Certificate)
		}
		s.writeAudit(rec)
		return nil, fmt.Errorf("target: handshake with %s: %w", addr, err)
	}
	return link, nil
}

// ServeListener accepts connections on ln and serves each on its own
// goroutine: the handshake (Handshake: a source without the source role is
// refused there), then the migration or query (ServeLink). At most
// Policy.MaxLinks links are served at once, handshakes included; a
// connection beyond that is closed at once and audited. A peer that never
// finishes its handshake holds only its own slot, for at most the
// handshake timeout. ServeListener closes ln when ctx ends and returns nil
// once every link it served has finished, or ln's error.
func (s *Server) ServeListener(ctx context.Context, ln net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("target: accept: %w", err)
		}
		select {
		case s.guard.links <- struct{}{}:
		default:
			addr := conn.RemoteAddr()
			conn.Close()
			reason := fmt.Errorf("%w: serving %d links already", ErrBusy, cap(s.guard.links))
			s.log.Warn("connection refused", "peer", addrString(addr), "err", reason)
			s.writeAudit(&audit.Record{Event: audit.EventHandshake, Outcome: audit.OutcomeRefused,
				Reason: reason.Error(), Peer: audit.Peer{Addr: addrString(addr)}})
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-s.guard.links }()
			link, err := s.Handshake(ctx, conn)
			if err != nil {
				s.log.Warn("handshake refused", "err", err)
				return
			}
			if _, err := s.ServeLink(ctx, link); err != nil {
				s.log.Warn("migration failed", "err", err)
			}
		}()
	}
}

// ServeLink serves one link: a migration, or a query about an earlier one.
// It closes the link. The peer's certificate must name the source role
// (unless Policy.AnyCertificate): a link accepted without TransportConfig's
// check is refused here with an Abort of code policy. One record per link
// goes to the audit log.
func (s *Server) ServeLink(ctx context.Context, link *transport.Link) (*Report, error) {
	start := time.Now()
	st, isTLS := link.TLSState()
	var cert *x509.Certificate
	if len(st.PeerCertificates) > 0 {
		cert = st.PeerCertificates[0]
	}
	peer := peerOf(link.RemoteAddr(), cert)
	if err := s.guard.verify(cert, isTLS); err != nil {
		tellRefused(link, err)
		link.Close()
		s.writeAudit(&audit.Record{Event: audit.EventHandshake, Peer: peer, Outcome: audit.OutcomeRefused, Reason: err.Error()})
		return nil, err
	}
	rep, err := s.serveLink(ctx, link)
	s.writeAudit(auditRecord(rep, err, peer, start))
	return rep, err
}

// tellRefused tells the source, best effort and within a second, why the
// target ends its link before any migration began: an Abort whose code
// says what kind of failure err is.
func tellRefused(link *transport.Link, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = link.Control().Send(ctx, &transport.Abort{Code: abortCode(err), Reason: err.Error()})
}

// reserve records a new migration ID as preparing; it returns false, and
// records nothing, if the ID is already known.
func (s *Server) reserve(id transport.MigrationID) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, known := s.outcomes[id]; known {
		return false
	}
	s.outcomes[id] = transport.StatePreparing
	return true
}

func (s *Server) writeAudit(r *audit.Record) {
	if err := s.guard.audit.Write(r); err != nil {
		s.log.Error("audit record lost", "err", err)
	}
}

// auditRecord describes a served link.
func auditRecord(rep *Report, err error, peer audit.Peer, start time.Time) *audit.Record {
	r := &audit.Record{Event: audit.EventLink, Peer: peer, Outcome: audit.OutcomeAborted,
		Duration: time.Since(start).Seconds()}
	if err != nil {
		r.Reason = err.Error()
	}
	if rep == nil {
		return r
	}
	r.Migration = rep.Migration.String()
	if rep.Query {
		r.Event, r.Outcome = audit.EventQuery, audit.OutcomeAnswered
		return r
	}
	r.Event, r.Connections = audit.EventMigration, rep.Count
	switch {
	case rep.State == StateCommitted:
		r.Outcome = audit.OutcomeCommitted
	case rep.State == StateInit && refusedWhole(err):
		r.Outcome = audit.OutcomeRefused
	}
	locals := map[string]bool{}
	for _, c := range rep.Conns {
		if r.Verdicts == nil {
			r.Verdicts = map[string]int{}
		}
		r.Verdicts[c.Verdict.String()]++
		if c.Delivered {
			r.Delivered++
		}
		locals[c.Local.String()] = true
		if c.Err != nil && len(r.Refused) < audit.MaxListed {
			r.Refused = append(r.Refused, audit.Conn{Index: c.Index, Local: c.Local.String(), Remote: c.Remote.String(),
				Verdict: c.Verdict.String(), Reason: c.Err.Error()})
		}
	}
	r.Locals = len(locals)
	for l := range locals {
		r.Local = append(r.Local, l)
	}
	sort.Strings(r.Local)
	if len(r.Local) > audit.MaxListed {
		r.Local = r.Local[:audit.MaxListed]
	}
	return r
}

func peerOf(addr net.Addr, cert *x509.Certificate) audit.Peer {
	p := audit.Peer{Addr: addrString(addr)}
	if cert != nil {
		p.Subject = cert.Subject.String()
		p.Serial = cert.SerialNumber.Text(16)
		for _, r := range certs.Roles(cert) {
			p.Roles = append(p.Roles, string(r))
		}
	}
	return p
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}
