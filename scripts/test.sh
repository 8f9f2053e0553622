#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests that boot real KVM guests in real `tern`
# processes and migrate them over real sockets. Needs /dev/kvm (root). Tests that need QEMU
# (qemu-system-x86_64), network namespaces or the Linux kernel that scripts/install-deps.sh fetches
# skip with a message when those are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --release --workspace "$@"
