package repair

import (
	"net"
	"strconv"
)

// interfaceIndex resolves an IPv6 zone (an interface name or number).
func interfaceIndex(zone string) (uint32, error) {
	if n, err := strconv.ParseUint(zone, 10, 32); err == nil {
		return uint32(n), nil
	}
	ifi, err := net.InterfaceByName(zone)
	if err != nil {
		return 0, err
	}
	return uint32(ifi.Index), nil
}
