// Package certs mints the certificates of a small tcpmigrate fleet: one CA,
// and host certificates that name the roles their holder may play on a link
// (roles.go: a URI SAN tcpmigrate:role=source for `send`, role=target for
// `receive`; both by default). `tcpmigrate certs` and the tests use it, so
// that mutual TLS is also the easy way.
package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// CA is a certificate authority that signs host certificates.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	PEM  []byte // the certificate, PEM-encoded
}

// NewCA mints a self-signed ECDSA P-256 CA valid for the given duration.
func NewCA(name string, valid time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("certs: CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"tcpmigrate"}},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(valid),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("certs: CA certificate: %w", err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// Host is a host's certificate and key, PEM-encoded.
type Host struct {
	CertPEM, KeyPEM []byte
}

// issue mints a host certificate named name, valid for the given host
// names and IP addresses, naming roles (see IssueRoles).
func (ca *CA) issue(name string, hosts []string, valid time.Duration, roles []Role) (*Host, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("certs: key for %s: %w", name, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name, Organization: []string{"tcpmigrate"}},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(valid),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, r := range roles {
		tmpl.URIs = append(tmpl.URIs, r.URI())
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("certs: certificate for %s: %w", name, err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("certs: key for %s: %w", name, err)
	}
	return &Host{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}),
	}, nil
}

// TLSConfig returns a tls.Config presenting h and trusting ca for both
// directions, as transport.NewConfig expects.
func (h *Host) TLSConfig(ca *CA) (*tls.Config, error) {
	cert, err := tls.X509KeyPair(h.CertPEM, h.KeyPEM)
	if err != nil {
		return nil, fmt.Errorf("certs: load host pair: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ClientCAs: pool, MinVersion: tls.VersionTLS13}, nil
}

// WriteFiles writes ca.pem into dir and, for each host, NAME.pem and
// NAME-key.pem (mode 0600 for keys).
func WriteFiles(dir string, ca *CA, hosts map[string]*Host) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("certs: %w", err)
	}
	errs := []error{os.WriteFile(filepath.Join(dir, "ca.pem"), ca.PEM, 0o644)}
	for name, h := range hosts {
		errs = append(errs,
			os.WriteFile(filepath.Join(dir, name+".pem"), h.CertPEM, 0o644),
			os.WriteFile(filepath.Join(dir, name+"-key.pem"), h.KeyPEM, 0o600))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("certs: write files: %w", err)
	}
	return nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}
