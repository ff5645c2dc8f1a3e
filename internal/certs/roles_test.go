package certs

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"slices"
	"testing"
	"time"
)

func parseHost(t *testing.T, h *Host) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(h.CertPEM)
	if b == nil {
		t.Fatal("no PEM block")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRoles checks the roles each way of issuing puts in a certificate,
// their URI form, and that the certificate still verifies for both TLS
// directions.
func TestRoles(t *testing.T) {
	ca, err := NewCA("test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	both, err := ca.Issue("both", []string{"198.18.0.2"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	src, err := ca.IssueRoles("src", []string{"198.18.0.2"}, time.Hour, RoleSource)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := ca.IssueRoles("dst", []string{"198.18.0.3"}, time.Hour, RoleTarget)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	for name, tc := range map[string]struct {
		h    *Host
		want []Role
	}{
		"both":   {both, []Role{RoleSource, RoleTarget}},
		"source": {src, []Role{RoleSource}},
		"target": {dst, []Role{RoleTarget}},
	} {
		c := parseHost(t, tc.h)
		if got := Roles(c); !slices.Equal(got, tc.want) {
			t.Errorf("%s: roles %v, want %v", name, got, tc.want)
		}
		for _, r := range []Role{RoleSource, RoleTarget} {
			if HasRole(c, r) != slices.Contains(tc.want, r) {
				t.Errorf("%s: HasRole(%s) = %v", name, r, HasRole(c, r))
			}
		}
		for _, eku := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
			if _, err := c.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{eku}}); err != nil {
				t.Errorf("%s: verify for usage %v: %v", name, eku, err)
			}
		}
	}
	if got := RoleSource.URI().String(); got != "tcpmigrate:role=source" {
		t.Errorf("URI %q", got)
	}
	if _, err := ca.IssueRoles("none", nil, time.Hour); !errors.Is(err, ErrRole) {
		t.Errorf("no role: %v, want ErrRole", err)
	}
	if _, err := ca.IssueRoles("bad", nil, time.Hour, Role("admin")); !errors.Is(err, ErrRole) {
		t.Errorf("unknown role: %v, want ErrRole", err)
	}
	if Roles(nil) != nil {
		t.Error("Roles(nil) is not empty")
	}
}
