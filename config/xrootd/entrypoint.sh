#!/bin/sh
# Generates a throw-away CA and host certificate on first start (kept in /etc/xrootd/pki, a volume
# Spool's containers mount read-only to trust it), then runs xrootd in the foreground as xrootd.
set -eu
pki=/etc/xrootd/pki
host=${XROOTD_HOST:-xrootd}
if [ ! -f "$pki/host.pem" ]; then
  cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Spool compose CA" \
    -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" -keyout host.key -out host.csr 2>/dev/null
  printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' \
    "$host" > ext.cnf
  openssl x509 -req -in host.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile ext.cnf -out host.pem 2>/dev/null
  mkdir -p cadir && cp ca.pem cadir/ && openssl rehash cadir
  chmod 0600 host.key && chown -R xrootd:xrootd "$pki" && chmod 0644 ca.pem
fi
exec xrootd -R xrootd -c /etc/xrootd/spool.cfg -n spool "$@"
