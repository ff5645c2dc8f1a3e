package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tcpmigrate/tcpmigrate/internal/certs"
)

func certsCommand() *cli.Command {
	return &cli.Command{
		Name:      "certs",
		Usage:     "mint a CA and host certificates for mutual TLS between agents",
		UsageText: "tcpmigrate certs --dir DIR (--host | --source-host | --target-host) NAME=ADDR[,ADDR...] [...]",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Usage: "directory to write ca.pem, NAME.pem and NAME-key.pem into"},
			&cli.StringSliceFlag{Name: "host", Usage: "NAME=ADDR[,ADDR...]: a host that may both send and receive, and the names or addresses its certificate is valid for"},
			&cli.StringSliceFlag{Name: "source-host", Usage: "NAME=ADDR[,ADDR...]: a host that may only send (role source)"},
			&cli.StringSliceFlag{Name: "target-host", Usage: "NAME=ADDR[,ADDR...]: a host that may only receive (role target)"},
			&cli.DurationFlag{Name: "valid", Value: 365 * 24 * time.Hour, Usage: "validity of the certificates"},
		},
		Action: func(c *cli.Context) error {
			if err := require(c, "dir"); err != nil {
				return err
			}
			ca, err := certs.NewCA("tcpmigrate CA", c.Duration("valid"))
			if err != nil {
				return err
			}
			hosts := map[string]*certs.Host{}
			for _, f := range []struct {
				flag  string
				roles []certs.Role
			}{
				{"host", []certs.Role{certs.RoleSource, certs.RoleTarget}},
				{"source-host", []certs.Role{certs.RoleSource}},
				{"target-host", []certs.Role{certs.RoleTarget}},
			} {
				for _, h := range c.StringSlice(f.flag) {
					name, addrs, ok := strings.Cut(h, "=")
					if !ok || name == "" || addrs == "" || strings.ContainsAny(name, "/.") {
						return usageError{fmt.Errorf("--%s %q: want NAME=ADDR[,ADDR...]", f.flag, h)}
					}
					if hosts[name] != nil {
						return usageError{fmt.Errorf("--%s %q: host %s given twice", f.flag, h, name)}
					}
					if hosts[name], err = ca.IssueRoles(name, strings.Split(addrs, ","), c.Duration("valid"), f.roles...); err != nil {
						return err
					}
				}
			}
			if len(hosts) == 0 {
				return usageError{fmt.Errorf("give at least one --host, --source-host or --target-host")}
			}
			if err := certs.WriteFiles(c.String("dir"), ca, hosts); err != nil {
				return err
			}
			fmt.Printf("wrote %s/ca.pem and a certificate and key for each of %d hosts\n", c.String("dir"), len(hosts))
			return nil
		},
	}
}
