package bench

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tcpmigrate/tcpmigrate/internal/journal"
	"github.com/tcpmigrate/tcpmigrate/internal/lab"
)

// Components times, in the same run and on the same hosts, fixed steps
// that the phases of a migration are made of, to explain them. Each is a
// distribution over a few samples.
type Components struct {
	// LockTable is firewall.New: creating a lock table, as each agent does
	// per migration (the target on Prepare). LockBatch and UnlockBatch lock
	// and unlock the calibration connections' tuples in one batch.
	LockTable   *Dist `json:"lock_table_us"`
	LockBatch   *Dist `json:"lock_batch_us"`
	UnlockBatch *Dist `json:"unlock_batch_us"`
	// JournalSmall is journal.Write of a record without connections, like
	// the target's; JournalConns of a record listing Conns connections, like
	// the source's. Both fsync the file and its directory.
	JournalSmall *Dist `json:"journal_write_us"`
	JournalConns *Dist `json:"journal_write_conns_us"`
	// PacketClose is closing a bound AF_PACKET socket, as the claim of the
	// service address does after its gratuitous ARPs.
	PacketClose *Dist `json:"packet_socket_close_us"`
}

// measureComponents times the journal writes in dir (on the agents'
// file system) and the packet socket close inside ns.
func measureComponents(dir string, ns *lab.NS, conns int) (small, big, packetClose []time.Duration, err error) {
	jr, err := journal.Open(filepath.Join(dir, "journal-components"))
	if err != nil {
		return nil, nil, nil, err
	}
	rec := journal.Record{Migration: "0123456789abcdef0123456789abcdef", Role: journal.Target, State: "committing",
		Peer: "198.18.0.2:50000", Lock: "tgt-0123456789abcdef", AgentPID: os.Getpid()}
	for range 8 {
		t := time.Now()
		if err := jr.Write(&rec); err != nil {
			return nil, nil, nil, err
		}
		small = append(small, time.Since(t))
	}
	rec.Role, rec.Migration = journal.Source, "fedcba9876543210fedcba9876543210"
	for i := range conns {
		rec.Conns = append(rec.Conns, journal.Conn{Index: uint32(i), FD: -1, Family: unix.AF_INET,
			Local:  netip.AddrPortFrom(svcAddr.Addr(), staticPort),
			Remote: netip.AddrPortFrom(peerAddr.Addr(), uint16(32768+i%28000))})
	}
	for range 4 {
		t := time.Now()
		if err := jr.Write(&rec); err != nil {
			return nil, nil, nil, err
		}
		big = append(big, time.Since(t))
	}
	err = ns.Do(func() error {
		ifi, err := netInterface("eth0")
		if err != nil {
			return err
		}
		for range 5 {
			fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
			if err != nil {
				return fmt.Errorf("bench: packet socket: %w", err)
			}
			if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifi}); err != nil {
				unix.Close(fd)
				return fmt.Errorf("bench: bind packet socket: %w", err)
			}
			t := time.Now()
			unix.Close(fd)
			packetClose = append(packetClose, time.Since(t))
		}
		return nil
	})
	return small, big, packetClose, err
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// netInterface returns the index of the device named name in the calling
// thread's namespace.
func netInterface(name string) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("bench: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 0, fmt.Errorf("bench: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		return 0, fmt.Errorf("bench: SIOCGIFINDEX %s: %w", name, err)
	}
	return int(ifr.Uint32()), nil
}
