#!/bin/sh
# Builds least-connections-c.wasm, a core module edgeproxy loads as a policy (it wraps it
# into a component itself). Needs clang and wasm-ld (Debian: apt-get install clang lld).
# -mbulk-memory: copies become memory.copy instead of calls to a libc memcpy.
set -eu
cd "$(dirname "$0")"
out=${1:-least-connections-c.wasm}
${CC:-clang} --target=wasm32-unknown-unknown -O2 -nostdlib -ffreestanding -mbulk-memory \
  -Wall -Wextra -Werror \
  -Wl,--no-entry -Wl,--strip-all \
  -o "$out" policy.c
echo "$out"
