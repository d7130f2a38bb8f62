#!/bin/sh
# A throw-away CA and the two certificates mutual TLS needs, in the layout docker-compose.tls.yml mounts and
# the Kubernetes tls component's Secrets hold (tls.crt, tls.key, ca.crt per folder):
#   OUT/servers: vision and language servers (serverAuth + clientAuth; DNS dvd-servers, localhost)
#   OUT/gateway: the gateway's client certificate
# Usage: deploy/tls-certs.sh [OUT=deploy/tls] [DAYS=365]. For production, issue these from your own CA.
set -eu
out=${1:-$(dirname "$0")/tls}
days=${2:-365}
mkdir -p "$out/servers" "$out/gateway"
chmod 0700 "$out"  # the keys inside are readable by the containers' user (uid 10001), so OUT is private
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=dvd-ca" -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null

issue() {  # folder, common name, subjectAltName, extendedKeyUsage
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$out/$1/tls.key" -out "$work/$1.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=critical,CA:FALSE\n' "$3" "$4" > "$work/$1.ext"
  openssl x509 -req -in "$work/$1.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial -days "$days" \
    -extfile "$work/$1.ext" -out "$out/$1/tls.crt" 2>/dev/null
  cp "$work/ca.crt" "$out/$1/ca.crt"
  chmod 0644 "$out/$1/tls.key"
}
issue servers dvd-servers "DNS:dvd-servers,DNS:localhost" "serverAuth,clientAuth"
issue gateway dvd-gateway "DNS:dvd-gateway" "clientAuth"
echo "wrote $out/servers and $out/gateway (CA: $out/servers/ca.crt)"
