#!/usr/bin/env bash
# Makes a private CA and a server certificate signed by it, for local TLS runs and tests:
#   DIR/ca.pem, DIR/ca.key          the CA (trust ca.pem in clients: loadgen --tls-ca, ...)
#   DIR/server.pem, DIR/server.key  the server's chain and key ([tls] cert_file / key_file)
# ECDSA P-256 keys (cheap signatures: full handshakes cost less than with RSA), valid for
# `localhost`, 127.0.0.1 and ::1 plus any names given, for 825 days. Uses openssl.
#
#   scripts/make-certs.sh [--force] [DIR] [EXTRA_DNS_NAME...]   (DIR defaults to ./certs)
#
# Without --force an existing DIR/server.pem is kept. Re-running with --force issues a new
# server certificate from the same CA (that is how to try `POST /reload-tls` or SIGHUP).
set -euo pipefail
force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi
dir="${1:-certs}"
shift || true
command -v openssl >/dev/null 2>&1 || { echo "make-certs: openssl not found (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
if [ -f "$dir/server.pem" ] && [ "$force" = 0 ]; then
  echo "make-certs: $dir/server.pem exists (use --force for a new one)"
  exit 0
fi
if [ ! -f "$dir/ca.key" ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key"
  openssl req -x509 -new -key "$dir/ca.key" -sha256 -days 825 -subj "/CN=Gatehouse local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/ca.pem" 2>/dev/null
fi
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do san="$san,DNS:$name"; done
openssl ecparam -name prime256v1 -genkey -noout -out "$dir/server.key.tmp"
openssl pkcs8 -topk8 -nocrypt -in "$dir/server.key.tmp" -out "$dir/server.key.p8"
rm -f "$dir/server.key.tmp"
openssl req -new -key "$dir/server.key.p8" -subj "/CN=localhost" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n' "$san" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 825 -sha256 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
# The key last, by rename: a reload racing this script sees a mismatched pair, refuses it and
# keeps serving the old one; the next reload picks up the new pair.
mv "$dir/server.key.p8" "$dir/server.key"
chmod 600 "$dir/server.key" "$dir/ca.key"
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
echo "make-certs: $dir/server.pem and $dir/server.key (for $san), signed by $dir/ca.pem"
