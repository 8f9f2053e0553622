#!/usr/bin/env bash
# Two "hosts" on this machine: network namespaces tern-src (10.77.0.1) and tern-dst (10.77.0.2)
# joined by a veth pair, optionally shaped with tc tbf (netem is not available on this kernel).
#   scripts/netns.sh up [RATE]     RATE like 1gbit (default: unshaped)
#   scripts/netns.sh down
set -euo pipefail
SRC=tern-src DST=tern-dst
case "${1:-}" in
up)
  rate="${2:-}"
  "$0" down >/dev/null 2>&1 || true
  ip netns add $SRC
  ip netns add $DST
  ip link add tern-veth-s netns $SRC type veth peer name tern-veth-d netns $DST
  ip -n $SRC addr add 10.77.0.1/24 dev tern-veth-s
  ip -n $DST addr add 10.77.0.2/24 dev tern-veth-d
  for ns in $SRC $DST; do ip -n $ns link set lo up; done
  ip -n $SRC link set tern-veth-s up
  ip -n $DST link set tern-veth-d up
  if [ -n "$rate" ]; then
    # Shape both directions; burst sized for the rate, 20 ms queue as in shared/TESTBED.md.
    ip netns exec $SRC tc qdisc add dev tern-veth-s root tbf rate "$rate" burst 256kb latency 20ms
    ip netns exec $DST tc qdisc add dev tern-veth-d root tbf rate "$rate" burst 256kb latency 20ms
  fi
  ;;
down)
  ip netns del $SRC 2>/dev/null || true
  ip netns del $DST 2>/dev/null || true
  ;;
*) echo "usage: $0 up [RATE] | down" >&2; exit 2 ;;
esac
