#!/bin/sh
# Builds geo-load-python.wasm, a component edgeproxy loads as a policy. Needs
# componentize-py (pip install componentize-py==0.25.1), which bundles CPython; the
# component imports WASI, which edgeproxy links granting nothing.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/geo-load-python.wasm}
componentize-py -d "$here/../../../wit" -w policy componentize -p "$here" app -o "$out" >/dev/null
echo "$out"
