#!/usr/bin/env bash
# The test command of the README: installs what the tests need, checks
# formatting and lint, runs every test (as root nothing skips; with CI=true a
# skip is a failure) and runs each fuzz target briefly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PATH:/usr/local/go/bin:$(go env GOPATH)/bin"

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then echo "gofmt would change: $unformatted"; exit 1; fi
echo "== go vet"
go vet ./...
echo "== staticcheck"
staticcheck ./...

echo "== go test"
# Packages run one at a time: the root-only tests build namespaces and
# measure packet flows, and this machine has two cores.
go test -count=1 -p 1 -timeout 20m ./...

echo "== fuzz (brief)"
# A count, not a duration: Go 1.26's fuzz coordinator can report a spurious
# "context deadline exceeded" when a duration runs out on a loaded machine
# (golang/go#75804, fixed in Go 1.27); a count has no deadline to race.
fuzztime="${FUZZTIME:-50000x}"
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for f in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
    echo "-- $pkg $f"
    go test -run '^$' -fuzz "^${f}\$" -fuzztime "$fuzztime" "$pkg"
  done
done
echo "tests: all passed"
