package target_test

import (
	"context"
	"io"
	"log"
	"net/netip"

	"github.com/tcpmigrate/tcpmigrate/target"
	"github.com/tcpmigrate/tcpmigrate/transport"
)

// A Go program on the target receives migrated connections as net.Conns,
// with the state that travelled with each, and carries on serving them.
// e2e/agents_test.go runs this path for real, in network namespaces.
func ExampleServer() {
	tc, err := transport.LoadConfig("dst.pem", "dst-key.pem", "ca.pem")
	if err != nil {
		log.Print(err)
		return
	}
	srv, err := target.NewServer(target.Config{
		Transport: tc,
		Allow:     []netip.Prefix{netip.MustParsePrefix("198.18.0.10/32")},
		Deliver: func(_ context.Context, conns []*target.Delivered) map[uint32]error {
			for _, d := range conns {
				c, err := d.Conn()
				if err != nil {
					return map[uint32]error{d.Index: err}
				}
				go func() { // serve the connection from where it was: here, an echo
					defer c.Close()
					io.Copy(c, c)
				}()
				_ = d.AppState // the state the source sent with it
			}
			return nil
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	ln, err := transport.Listen("198.18.0.3:7946", tc)
	if err != nil {
		log.Print(err)
		return
	}
	log.Fatal(srv.Serve(context.Background(), ln))
}
