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
		UsageText: "tcpmigrate certs --dir DIR --host NAME=ADDR[,ADDR...] [--host ...]",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Required: true, Usage: "directory to write ca.pem, NAME.pem and NAME-key.pem into"},
			&cli.StringSliceFlag{Name: "host", Required: true, Usage: "NAME=ADDR[,ADDR...]: a host and the names or addresses its certificate is valid for"},
			&cli.DurationFlag{Name: "valid", Value: 365 * 24 * time.Hour, Usage: "validity of the certificates"},
		},
		Action: func(c *cli.Context) error {
			ca, err := certs.NewCA("tcpmigrate CA", c.Duration("valid"))
			if err != nil {
				return err
			}
			hosts := map[string]*certs.Host{}
			for _, h := range c.StringSlice("host") {
				name, addrs, ok := strings.Cut(h, "=")
				if !ok || name == "" || addrs == "" || strings.ContainsAny(name, "/.") {
					return usageError{fmt.Errorf("--host %q: want NAME=ADDR[,ADDR...]", h)}
				}
				if hosts[name], err = ca.Issue(name, strings.Split(addrs, ","), c.Duration("valid")); err != nil {
					return err
				}
			}
			if err := certs.WriteFiles(c.String("dir"), ca, hosts); err != nil {
				return err
			}
			fmt.Printf("wrote %s/ca.pem and a certificate and key for each of %d hosts\n", c.String("dir"), len(hosts))
			return nil
		},
	}
}
