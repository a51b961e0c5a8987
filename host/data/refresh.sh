#!/usr/bin/env bash
# Replaces the embedded GeoIP database with the newest published one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent @ip-location-db/geo-whois-asn-country-mmdb >/dev/null && tar xzf ./*.tgz)
cp "$tmp/package/geo-whois-asn-country.mmdb" "$here/"
cp "$tmp/package/NRO_LICENSE" "$here/"
echo "updated $here/geo-whois-asn-country.mmdb ($(jq -r .version "$tmp/package/package.json" 2>/dev/null || echo version unknown))"
