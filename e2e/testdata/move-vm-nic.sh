#!/bin/sh
# move-vm-nic.sh FROM TO: the hypervisor's part of the switch. The VM's NIC
# (a macvlan with the VM's own MAC and address) leaves host FROM and comes
# up on host TO, which announces it so that the switch learns the MAC's new
# port. Uses VM_ADDR and VM_MAC from the environment.
set -eu
from=$1 to=$2
ip -n "$from" link del vm0 2>/dev/null || true
ip -n "$to" link add vm0 link eth0 address "$VM_MAC" type macvlan mode bridge
ip -n "$to" addr add "$VM_ADDR" dev vm0
ip -n "$to" link set vm0 up
# The VM's first frame from its new port: the bridge learns where it is.
ip netns exec "$to" ping -c 1 -W 1 -I vm0 198.18.0.1 >/dev/null 2>&1 || true
