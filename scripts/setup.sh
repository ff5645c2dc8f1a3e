#!/usr/bin/env bash
# Installs what tcpmigrate's tests and demo need on a fresh Debian machine
# (run as root): the Debian packages below, staticcheck, and the Go modules.
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin"

# iproute2: namespaces and links for the lab; nftables: nft(8), used by tests
# only to read the ruleset back (the code itself speaks netlink); tcpdump:
# captures that prove no RST; socat: an unmodified peer and workload; procps:
# sysctl; kmod: modprobe for the nf_tables modules.
pkgs=(iproute2 nftables tcpdump socat procps kmod ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v staticcheck >/dev/null 2>&1; then
  echo "setup: installing staticcheck"
  go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
fi

go mod download
