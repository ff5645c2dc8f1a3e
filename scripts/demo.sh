#!/usr/bin/env bash
# The main job of the README: install what is needed, build tcpmigrate and
# run its self-contained demo (a lab of network namespaces, a workload with
# live streaming connections migrated between two hosts). Needs root.
# Extra arguments go to `tcpmigrate demo` (for example --conns 100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PATH:/usr/local/go/bin"
go build -o bin/tcpmigrate ./cmd/tcpmigrate
exec ./bin/tcpmigrate demo "$@"
