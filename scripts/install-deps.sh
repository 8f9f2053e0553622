#!/usr/bin/env bash
# Installs the system packages Tern's build, tests and benchmarks need on a fresh Debian 12 machine:
#   qemu-system-x86 (10.0 from bookworm-backports: the side-by-side reference VMM), iproute2 (netns, veth, tc),
#   libclang-dev (bindgen in the userfaultfd crate's build), and Debian's Linux kernel image for the `--kernel` tests (unpacked into $TERN_LINUX_DIR, default
#   /var/cache/tern/linux, as vmlinuz; NOT installed into /boot).
set -euo pipefail
linux_dir=${TERN_LINUX_DIR:-/var/cache/tern/linux}
fetch_linux() {
  [ -f "$linux_dir/vmlinuz" ] && return 0
  if [ "$(id -u)" != 0 ]; then echo "install-deps: need root to fetch the Linux kernel into $linux_dir" >&2; return 1; fi
  local pkg tmp
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "install-deps: no linux-image-<version>-amd64 package found" >&2; return 1; }
  tmp=$(mktemp -d)
  chmod 755 "$tmp"
  (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null 2>&1)
  dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/x"
  mkdir -p "$linux_dir"
  cp "$tmp"/x/boot/vmlinuz-* "$linux_dir/vmlinuz"
  cp "$tmp"/x/boot/config-* "$linux_dir/config"
  echo "$pkg" > "$linux_dir/package"
  rm -rf "$tmp"
}
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
command -v openssl >/dev/null || need+=(openssl) # scripts/tls-certs.sh
# The userfaultfd crate (post-copy pager, crates/vmm/src/postcopy) runs bindgen, which needs libclang.
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -eq 0 ]; then fetch_linux; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "install-deps: need root to install ${need[*]}" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
src=/etc/apt/sources.list.d/tern-backports.sources
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$src"
fi
apt-get update -qq
# Prefer the backport (QEMU 10.0, the reference in docs); fall back to the release's QEMU.
apt-get install -y -qq -t bookworm-backports "${need[@]}" >/dev/null || apt-get install -y -qq "${need[@]}" >/dev/null
fetch_linux
