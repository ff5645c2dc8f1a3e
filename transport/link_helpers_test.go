package transport

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
	der  []byte
}

func newCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool, der: der}
}

// issue returns a certificate for an agent, valid for 127.0.0.1 and
// "localhost", for both server and client authentication.
func (ca *testCA) issue(t testing.TB, name string) (tls.Certificate, []byte, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return pair, certPEM, keyPEM
}

// tlsConfig returns a Config for an agent whose certificate is signed by
// issuer and which trusts trust.
func tlsConfig(t testing.TB, issuer, trust *testCA, name string) *Config {
	pair, _, _ := issuer.issue(t, name)
	return NewConfig(&tls.Config{
		Certificates: []tls.Certificate{pair},
		RootCAs:      trust.pool,
		ClientCAs:    trust.pool,
	})
}

// writePEMs writes an agent's certificate, key and the CA to files.
func writePEMs(t testing.TB, ca *testCA, name string) (certFile, keyFile, caFile string) {
	dir := t.TempDir()
	_, certPEM, keyPEM := ca.issue(t, name)
	certFile = filepath.Join(dir, name+".crt")
	keyFile = filepath.Join(dir, name+".key")
	caFile = filepath.Join(dir, "ca.crt")
	for f, b := range map[string][]byte{
		certFile: certPEM, keyFile: keyPEM,
		caFile: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.der}),
	} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return
}

// A transport kind that tests run over: an in-memory pipe (plaintext),
// loopback TCP (plaintext) and TLS over loopback TCP.
type kind string

const (
	kindPipe kind = "pipe"
	kindTCP  kind = "tcp"
	kindTLS  kind = "tls"
)

var allKinds = []kind{kindPipe, kindTCP, kindTLS}

// configs returns the client and server Configs for a kind.
func configs(t testing.TB, k kind) (client, server *Config) {
	if k != kindTLS {
		return InsecureConfig(), InsecureConfig()
	}
	ca := newCA(t, "test CA")
	return tlsConfig(t, ca, ca, "source"), tlsConfig(t, ca, ca, "target")
}

// connPair returns two connected net.Conns of the kind.
func connPair(t testing.TB, k kind) (client, server net.Conn) {
	t.Helper()
	if k == kindPipe {
		return net.Pipe()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	return client, r.c
}

// handshakePair runs Client and Server on the two ends of a connection of
// the kind and returns their results.
func handshakePair(t testing.TB, k kind, ccfg, scfg *Config) (cl, sv *Link, cerr, serr error) {
	t.Helper()
	cc, sc := connPair(t, k)
	return handshakeConns(cc, sc, ccfg, scfg)
}

// handshakeConns runs Client and Server on the two ends of a connection.
func handshakeConns(cc, sc net.Conn, ccfg, scfg *Config) (cl, sv *Link, cerr, serr error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sv, serr = Server(ctx, sc, scfg)
	}()
	cl, cerr = Client(ctx, cc, ccfg)
	wg.Wait()
	return
}

// linkPair returns a connected pair of Links of the kind; mutate may change
// the Configs first. Both are closed when the test ends.
func linkPair(t testing.TB, k kind, mutate func(client, server *Config)) (cl, sv *Link) {
	t.Helper()
	ccfg, scfg := configs(t, k)
	if mutate != nil {
		mutate(ccfg, scfg)
	}
	cl, sv, cerr, serr := handshakePair(t, k, ccfg, scfg)
	if cerr != nil || serr != nil {
		if cl != nil {
			cl.Close()
		}
		if sv != nil {
			sv.Close()
		}
		t.Fatalf("handshake: client: %v; server: %v", cerr, serr)
	}
	t.Cleanup(func() {
		cl.Close()
		sv.Close()
	})
	return cl, sv
}

// forKinds runs f as a subtest for each kind.
func forKinds(t *testing.T, f func(t *testing.T, k kind)) {
	for _, k := range allKinds {
		t.Run(string(k), func(t *testing.T) { f(t, k) })
	}
}
