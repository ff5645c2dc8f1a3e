package source_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/netip"

	"github.com/tcpmigrate/tcpmigrate/source"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// A Go server hands its live connections to the source agent. conns are
// the server's connections, already quiet (the server no longer reads or
// writes them); state carries whatever the new instance needs to go on.
// e2e/agents_test.go runs this path for real, in network namespaces.
func ExampleMigrate() {
	var conns []*net.TCPConn // the server's connections
	tc, err := transport.LoadConfig("src.pem", "src-key.pem", "ca.pem")
	if err != nil {
		log.Print(err)
		return
	}
	var handed []source.Conn
	for _, c := range conns {
		f, err := c.File() // a second descriptor of the same socket
		if err != nil {
			log.Fatal(err)
		}
		handed = append(handed, source.Conn{File: f, AppState: []byte("session state")})
	}
	res, err := source.Migrate(context.Background(), source.Config{
		To:          "198.18.0.3:7946",
		Transport:   tc,
		SwitchAddrs: []netip.Prefix{netip.MustParsePrefix("198.18.0.10/24")},
	}, handed)
	if err != nil {
		log.Print(err)
	}
	for i, c := range res.Conns {
		switch c.Outcome {
		case source.Committed:
			conns[i].Close() // in repair mode: closes silently
		case source.RolledBack:
			handed[i].File.Close() // the connection carries on here
		}
		fmt.Println(c.Local, c.Remote, c.Outcome, c.Freeze)
	}
}
