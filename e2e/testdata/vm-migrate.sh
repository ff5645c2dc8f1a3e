#!/bin/sh
# Moves a "VM" (a workload with its own MAC and address) and its live TCP
# connections from one host to another, as an operator would script it
# around a hypervisor. The lab's hosts are network namespaces; on real
# hosts the `ip netns exec` prefixes go and each half runs on its host.
#
# Environment:
#   SRC, DST      the source and target hosts (network namespace names)
#   TCPMIGRATE    the tcpmigrate binary
#   CERTS         directory with ca.pem, agent.pem, agent-key.pem
#   VM_PID        the VM's workload on the source (it hands its sockets over on SIGUSR1)
#   VM_ADDR       the VM's address (CIDR), VM_MAC its MAC
#   ARRIVAL       command that starts the VM's workload on the target
#   WORK          a scratch directory
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tls="--cert $CERTS/agent.pem --key $CERTS/agent-key.pem --ca $CERTS/ca.pem"
vm_ip=${VM_ADDR%/*}

# 1. The hypervisor starts the VM on the target; it waits for its sockets.
ip netns exec "$DST" sh -c "$ARRIVAL" &
arrival=$!
echo "$arrival" > "$WORK/arrival.pid"

# 2. The target agent: restore the VM's connections, deliver them to it.
ip netns exec "$DST" "$TCPMIGRATE" receive --listen 198.18.0.3:7946 $tls --allow "$vm_ip/32" --once \
	--journal-dir "$WORK/journal-target" --deliver "unix:$WORK/deliver.sock" &
receiver=$!
while ! ip netns exec "$DST" ss -Htln 'sport = :7946' | grep -q .; do sleep 0.05; done
while [ ! -S "$WORK/deliver.sock" ]; do sleep 0.05; done

# 3. The source agent; at the switch the VM's NIC (MAC and address) moves.
ip netns exec "$SRC" "$TCPMIGRATE" send --to 198.18.0.3:7946 $tls --handoff "unix:$WORK/handoff.sock" \
	--on-switch "$here/move-vm-nic.sh $SRC $DST" --on-abort "$here/move-vm-nic.sh $DST $SRC" \
	--journal-dir "$WORK/journal-source" --json > "$WORK/send.json" &
sender=$!
while [ ! -S "$WORK/handoff.sock" ]; do sleep 0.05; done

# 4. The VM hands its connections over (on a real VM: its agent inside the guest).
kill -USR1 "$VM_PID"

status=0
wait "$sender" || status=$?
wait "$receiver" || status=$?
echo "arrival=$arrival"
exit "$status"
