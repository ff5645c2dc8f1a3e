package certs

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"
)

// Role is what the holder of a certificate may do on a tcpmigrate link. A
// certificate names its roles in URI subject alternative names of the form
// "tcpmigrate:role=NAME". The target agent refuses a source whose
// certificate does not name RoleSource (docs/security.md), so a certificate
// minted for a target cannot be used to push connections into another
// target, and a certificate from the same CA minted for something else
// than tcpmigrate is no key at all.
//
// Both extended key usages (TLS server and client) stay in every
// certificate: the role is checked by the agents, which can then say
// clearly why a peer was refused, rather than by the TLS stack, which only
// sends a "bad certificate" alert.
type Role string

// The roles.
const (
	// RoleSource may dial a target agent and migrate connections to it
	// (tcpmigrate send, tcpmigrate recover).
	RoleSource Role = "source"
	// RoleTarget may accept links from sources and restore their
	// connections (tcpmigrate receive).
	RoleTarget Role = "target"
)

// roleScheme and rolePrefix spell a role URI: tcpmigrate:role=source.
const (
	roleScheme = "tcpmigrate"
	rolePrefix = "role="
)

// ErrRole means a role name is not one this version knows.
var ErrRole = errors.New("certs: unknown role")

// ParseRole returns the role named s ("source" or "target").
func ParseRole(s string) (Role, error) {
	switch r := Role(s); r {
	case RoleSource, RoleTarget:
		return r, nil
	}
	return "", fmt.Errorf("%w %q (want source or target)", ErrRole, s)
}

// URI returns the URI SAN that names the role: tcpmigrate:role=NAME.
func (r Role) URI() *url.URL {
	return &url.URL{Scheme: roleScheme, Opaque: rolePrefix + string(r)}
}

// Roles returns the roles a certificate names, in the order of its URI
// SANs, without duplicates. Unknown role names are left out.
func Roles(cert *x509.Certificate) []Role {
	var roles []Role
	if cert == nil {
		return nil
	}
	for _, u := range cert.URIs {
		if u == nil || u.Scheme != roleScheme {
			continue
		}
		name, ok := strings.CutPrefix(u.Opaque, rolePrefix)
		if !ok {
			continue
		}
		if r, err := ParseRole(name); err == nil && !slices.Contains(roles, r) {
			roles = append(roles, r)
		}
	}
	return roles
}

// HasRole reports whether cert names role r.
func HasRole(cert *x509.Certificate, r Role) bool {
	return slices.Contains(Roles(cert), r)
}

// Issue mints a host certificate named name, valid for the given host
// names and IP addresses, for both roles: the host may send and receive.
func (ca *CA) Issue(name string, hosts []string, valid time.Duration) (*Host, error) {
	return ca.issue(name, hosts, valid, []Role{RoleSource, RoleTarget})
}

// IssueRoles mints a host certificate like Issue that names only the given
// roles (at least one): a host that only receives gets RoleTarget, one
// that only sends RoleSource.
func (ca *CA) IssueRoles(name string, hosts []string, valid time.Duration, roles ...Role) (*Host, error) {
	if len(roles) == 0 {
		return nil, fmt.Errorf("%w: certificate for %s names no role", ErrRole, name)
	}
	for _, r := range roles {
		if _, err := ParseRole(string(r)); err != nil {
			return nil, err
		}
	}
	return ca.issue(name, hosts, valid, roles)
}
