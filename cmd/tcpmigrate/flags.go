package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/tcpmigrate/tcpmigrate/internal/addrmove"
	"github.com/tcpmigrate/tcpmigrate/internal/certs"
	"github.com/tcpmigrate/tcpmigrate/repair"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// Flags shared by the commands that open a link.
var tlsFlags = []cli.Flag{
	&cli.StringFlag{Name: "cert", Usage: "this agent's certificate (PEM)"},
	&cli.StringFlag{Name: "key", Usage: "this agent's private key (PEM)"},
	&cli.StringFlag{Name: "ca", Usage: "the CA certificate(s) that sign the other agents' certificates (PEM)"},
	&cli.BoolFlag{Name: "insecure", Usage: "plaintext link without authentication (only on a trusted network)"},
	&cli.BoolFlag{Name: "uncompressed", Usage: "send snapshot streams uncompressed"},
}

var logFlags = []cli.Flag{
	&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
	&cli.StringFlag{Name: "journal-dir", Value: "", Usage: "where the agent keeps its recovery journal (default /run/tcpmigrate)"},
}

// transportConfig builds the link configuration from the TLS flags and the
// kernel's capabilities.
func transportConfig(c *cli.Context) (*transport.Config, error) {
	var cfg *transport.Config
	switch {
	case c.Bool("insecure"):
		if c.IsSet("cert") || c.IsSet("key") || c.IsSet("ca") {
			return nil, usageError{fmt.Errorf("--insecure excludes --cert, --key and --ca")}
		}
		cfg = transport.InsecureConfig()
	case c.String("cert") != "" && c.String("key") != "" && c.String("ca") != "":
		var err error
		if cfg, err = transport.LoadConfig(c.String("cert"), c.String("key"), c.String("ca")); err != nil {
			return nil, err
		}
	default:
		return nil, usageError{fmt.Errorf("give --cert, --key and --ca (mutual TLS), or --insecure")}
	}
	caps, err := repair.Probe()
	if err != nil {
		return nil, err
	}
	cfg.Capabilities = caps
	cfg.Require = repair.FeatRepair | repair.FeatRepairWindow
	if c.Bool("uncompressed") {
		cfg.Compression = transport.CompressNever
	}
	cfg.Software = "tcpmigrate"
	return cfg, nil
}

// requireTarget makes a source-side link refuse a peer whose certificate
// does not carry the target role (docs/security.md).
func requireTarget(cfg *transport.Config) {
	if cfg.Insecure {
		return
	}
	cfg.VerifyPeer = func(p *transport.PeerInfo) error {
		if p.Certificate == nil || !certs.HasRole(p.Certificate, certs.RoleTarget) {
			return fmt.Errorf("the peer's certificate does not carry the %s role", certs.RoleTarget)
		}
		return nil
	}
}

func logger(c *cli.Context) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(strings.ToLower(c.String("log-level")))); err != nil {
		return nil, usageError{fmt.Errorf("--log-level: %w", err)}
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})), nil
}

// portsFlag reads a repeatable port flag (--port, --allow-port).
func portsFlag(c *cli.Context, name string) ([]uint16, error) {
	var ports []uint16
	for _, p := range c.UintSlice(name) {
		if p == 0 || p > 65535 {
			return nil, usageError{fmt.Errorf("--%s %d: want 1 to 65535", name, p)}
		}
		ports = append(ports, uint16(p))
	}
	return ports, nil
}

// unixFlag reads a unix:PATH flag (--handoff, --deliver).
func unixFlag(c *cli.Context, name string) (string, error) {
	path, ok := strings.CutPrefix(c.String(name), "unix:")
	if !ok || path == "" {
		return "", usageError{fmt.Errorf("--%s takes unix:PATH", name)}
	}
	return path, nil
}

// addrFlag reads a service address flag (--claim-addr, --release-addr),
// which needs --dev; ok is false when the flag is not given.
func addrFlag(c *cli.Context, name string) (am addrmove.Config, ok bool, err error) {
	s := c.String(name)
	if s == "" {
		return am, false, nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return am, false, usageError{fmt.Errorf("--%s: %w", name, err)}
	}
	if c.String("dev") == "" {
		return am, false, usageError{fmt.Errorf("--%s needs --dev", name)}
	}
	return addrmove.Config{Prefix: p, Dev: c.String("dev")}, true, nil
}
