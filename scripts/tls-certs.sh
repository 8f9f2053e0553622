#!/usr/bin/env bash
# Create a CA and per-host certificates for migration over TLS (docs/tls.md), in the layout of
# QEMU's tls-creds-x509 `dir`: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
# client-key.pem. One directory per host; each host is both server (destination) and client
# (source), so each gets both pairs, all signed by the one CA.
#
#   scripts/tls-certs.sh OUT_DIR HOST [HOST...]
#
# OUT_DIR/ca/ca-key.pem is the CA's private key: keep it off the hosts.
# The CA's name carries a random suffix: two CAs made by this script never share a name (a
# verifier that finds a CA by name would report a bad signature instead of an unknown CA).
# Names: HOST is the certificate's CN and subjectAltName (DNS, or IP if it parses as one);
# the client certificate's subject is "CN=HOST,O=Tern" (what authz-simple's identity matches).
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 OUT_DIR HOST [HOST...]" >&2; exit 2; fi
out=$1; shift
days=${TERN_TLS_DAYS:-365}
umask 077
mkdir -p "$out/ca"
if [ ! -f "$out/ca/ca-key.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/O=Tern/CN=Tern migration CA $(openssl rand -hex 4)" -keyout "$out/ca/ca-key.pem" -out "$out/ca/ca-cert.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
san_of() {
  if [[ $1 =~ ^[0-9.]+$ || $1 == *:* ]]; then echo "IP:$1"; else echo "DNS:$1"; fi
}
issue() { # dir role host
  local dir=$1 role=$2 host=$3 eku
  if [ "$role" = server ]; then eku=serverAuth; else eku=clientAuth; fi
  local ext; ext=$(mktemp)
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
    "$eku" "$(san_of "$host")" > "$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=Tern/CN=$host" \
    -keyout "$dir/$role-key.pem" -out "$dir/$role.csr" 2>/dev/null
  openssl x509 -req -in "$dir/$role.csr" -CA "$out/ca/ca-cert.pem" -CAkey "$out/ca/ca-key.pem" \
    -CAcreateserial -days "$days" -extfile "$ext" -out "$dir/$role-cert.pem" 2>/dev/null
  rm -f "$dir/$role.csr" "$ext"
}
for host in "$@"; do
  dir="$out/$host"
  mkdir -p "$dir"
  cp "$out/ca/ca-cert.pem" "$dir/ca-cert.pem"
  issue "$dir" server "$host"
  issue "$dir" client "$host"
  chmod 0644 "$dir"/*-cert.pem
  echo "$dir: $(openssl x509 -in "$dir/client-cert.pem" -noout -subject -nameopt RFC2253)"
done
