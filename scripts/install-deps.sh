#!/usr/bin/env bash
# Installs the system packages Tern's build, tests and benchmarks need on a fresh Debian 12 machine:
#   qemu-system-x86 (10.0 from bookworm-backports: the side-by-side reference VMM), iproute2 (netns, veth, tc).
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "install-deps: need root to install ${need[*]}" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
src=/etc/apt/sources.list.d/tern-backports.sources
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$src"
fi
apt-get update -qq
# Prefer the backport (QEMU 10.0, the reference in docs); fall back to the release's QEMU.
apt-get install -y -qq -t bookworm-backports "${need[@]}" >/dev/null || apt-get install -y -qq "${need[@]}" >/dev/null
