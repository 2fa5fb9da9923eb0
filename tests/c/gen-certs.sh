#!/bin/sh
# ctest fixture for the TLS tests: a throwaway PKI made with the openssl command-line tool.
#   ca.pem        the CA the client pins
#   server.pem    a certificate for localhost and 127.0.0.1 signed by ca.pem (key server.key)
#   other-ca.pem  an unrelated CA that signed nothing the server presents (key other-ca.key)
# Usage: gen-certs.sh OPENSSL DIR. Remade on every run, so it never expires under a long-lived build dir.
set -eu
openssl=$1
dir=$2
mkdir -p "$dir"
cd "$dir"
rm -f ca.key ca.pem other-ca.key other-ca.pem server.key server.csr server.ext server.pem

key() { "$openssl" genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

ca() { # ca NAME CN
    key "$1.key"
    "$openssl" req -x509 -new -key "$1.key" -sha256 -days 2 -subj "/CN=$2" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$1.pem"
}

ca ca "pyagent test CA"
ca other-ca "pyagent unrelated test CA"

key server.key
"$openssl" req -new -key server.key -subj "/CN=localhost" -out server.csr
cat > server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
EXT
"$openssl" x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial 2 -days 2 -sha256 -extfile server.ext \
    -out server.pem
rm -f server.csr server.ext
"$openssl" verify -CAfile ca.pem server.pem >/dev/null
echo "gen-certs: test PKI in $dir"
