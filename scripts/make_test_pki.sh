#!/usr/bin/env bash
# Makes a throw-away PKI for TLS checks (CI, trying mTLS locally): a CA, a server certificate
# for localhost / 127.0.0.1, a client certificate (CN pipeline-a) from the same CA, and a
# client certificate from another CA. Needs openssl. Usage: make_test_pki.sh DIR
set -euo pipefail
d="${1:?usage: make_test_pki.sh DIR}"
mkdir -p "$d"
cd "$d"
mk_ca() { # name cn
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$2" \
    -keyout "$1.key" -out "$1.pem" 2>/dev/null
}
mk_leaf() { # name cn ca [san]
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  if [ -n "${4:-}" ]; then
    printf 'subjectAltName=%s\n' "$4" >"$1.ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' >"$1.ext"
  fi
  openssl x509 -req -in "$1.csr" -CA "$3.pem" -CAkey "$3.key" -CAcreateserial -days 2 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
mk_ca ca "voxconv test CA"
mk_ca rogue-ca "someone else's CA"
mk_leaf server "voxconv server" ca "DNS:localhost,IP:127.0.0.1"
mk_leaf client "pipeline-a" ca
mk_leaf rogue "intruder" rogue-ca
echo "test PKI in $d: ca.pem server.{pem,key} client.{pem,key} rogue.{pem,key}"
