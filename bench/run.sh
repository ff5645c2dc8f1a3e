#!/bin/bash
# Runs the benchmark matrix of docs/performance.md and writes every report
# into bench/latest.json (or the file given as the first argument): one
# object with the commit measured and, per run, its arguments and report.
# Needs root. The binary is built from a clean export of HEAD, not from the
# work tree, so that the figures belong to a commit. Each run first waits
# (at most 5 minutes) for the one-minute load average to fall below 1.0,
# since the machine may be shared; the load each run saw is in its report
# (env.load_before, env.load_after).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-bench/latest.json}")
rev=$(git rev-parse HEAD)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
git archive "$rev" | tar -x -C "$work/src"
(cd "$work/src" && go build -o "$work/tcpmigrate" ./cmd/tcpmigrate)
bin=$work/tcpmigrate

wait_idle() {
	for _ in $(seq 30); do
		awk '{exit !($1 < 1.0)}' /proc/loadavg && return
		sleep 10
	done
}

# The idle runs of the three targets are repeated (five, three and three
# times): one run of them varies by 20-50 % on this shared machine. The
# workload hands its sockets over live; one streaming run does it the old
# way (--paused-handoff) for comparison. The source pre-copies its quiet
# connections; three runs without (--no-precopy) are the baseline. The
# target delivers the busy connections first; the 10,000-connection
# streaming run, whose stall is closest to its target, is repeated three
# times, and run once with one delivery (--one-delivery) as the baseline.
runs=(
	"--conns 1"
	"--conns 1"
	"--conns 1"
	"--conns 1"
	"--conns 1"
	"--conns 1 --queue 65536"
	"--conns 1000"
	"--conns 1000"
	"--conns 1000"
	"--conns 1000 --queue 65536"
	"--conns 10000"
	"--conns 10000"
	"--conns 10000"
	"--conns 1000 --no-precopy"
	"--conns 10000 --no-precopy"
	"--conns 10000 --queue 65536"
	"--conns 10000 --queue 16384"
	"--conns 5000 --queue 65536"
	"--conns 2000 --queue 65536"
	"--conns 1 --stream"
	"--conns 1000 --stream"
	"--conns 1000 --stream --paused-handoff"
	"--conns 1000 --stream --no-precopy"
	"--conns 1000 --queue 65536 --stream"
	"--conns 10000 --stream"
	"--conns 10000 --stream"
	"--conns 10000 --stream"
	"--conns 10000 --stream --one-delivery"
	"--conns 10000 --queue 16384 --stream"
)
tmp=$work/out.json
printf '{"revision": "%s", "runs": [\n' "$rev" >"$tmp"
sep=""
for args in "${runs[@]}"; do
	wait_idle
	echo "tcpmigrate bench $args" >&2
	# A run that fails still prints its report, with the errors in it.
	report=$("$bin" bench $args --json) || true
	printf '%s{"args": "%s", "report": %s}\n' "$sep" "$args" "${report:-null}" >>"$tmp"
	sep=","
	sleep 5
done
echo ']}' >>"$tmp"
mv "$tmp" "$out"
echo "wrote $out" >&2
