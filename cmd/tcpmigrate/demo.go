package main

import (
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tcpmigrate/tcpmigrate/internal/demo"
)

func demoCommand() *cli.Command {
	return &cli.Command{
		Name:  "demo",
		Usage: "build a lab of network namespaces and migrate live streaming connections (needs root)",
		Flags: []cli.Flag{
			&cli.IntFlag{Name: "conns", Value: 8, Usage: "connections to migrate"},
			&cli.DurationFlag{Name: "before", Value: time.Second, Usage: "how long the streams run before the move"},
			&cli.DurationFlag{Name: "after", Value: 2 * time.Second, Usage: "how long the streams run after the move"},
		},
		Action: func(c *cli.Context) error {
			if c.Int("conns") < 1 {
				return usageError{fmt.Errorf("--conns must be at least 1")}
			}
			r, err := demo.Run(c.Context, demo.Options{
				Conns: c.Int("conns"), Before: c.Duration("before"), After: c.Duration("after"), Log: os.Stderr,
			})
			if r != nil {
				printDemoReport(r)
			}
			if err != nil {
				return err
			}
			if r.PeerResets != 0 {
				return fmt.Errorf("the peer saw %d resets", r.PeerResets)
			}
			return nil
		},
	}
}

func printDemoReport(r *demo.Report) {
	q := func(ds []time.Duration, p float64) time.Duration {
		s := slices.Clone(ds)
		slices.Sort(s)
		return s[int(p*float64(len(s)-1))].Round(time.Microsecond)
	}
	fmt.Printf("\ntcpmigrate demo report\n")
	fmt.Printf("  connections migrated        %d\n", r.Conns)
	fmt.Printf("  freeze per connection       min %s  p50 %s  max %s\n", q(r.Freeze, 0), q(r.Freeze, 0.5), q(r.Freeze, 1))
	fmt.Printf("  stall, bytes to the peer    min %s  p50 %s  max %s\n", q(r.Stall, 0), q(r.Stall, 0.5), q(r.Stall, 1))
	fmt.Printf("  stall, bytes from the peer  min %s  p50 %s  max %s\n", q(r.StallIn, 0), q(r.StallIn, 0.5), q(r.StallIn, 1))
	fmt.Printf("  queued state moved          %d bytes\n", r.StateBytes)
	fmt.Printf("  bytes verified              %d to the peer, %d from the peer, every byte once and in order\n", r.ToPeer, r.FromPeer)
	fmt.Printf("  resets seen by the peer     %d\n", r.PeerResets)
}
