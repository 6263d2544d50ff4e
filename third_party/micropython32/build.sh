#!/usr/bin/env bash
# Build MicroPython's unix port as a 32-bit (i686) program: 4-byte pointers and 16-byte GC blocks, like the
# ESP32, so heap figures measured with it are the chip's, not a 64-bit host's.
#   build.sh OUTDIR                  ->  OUTDIR/micropython32
#   build.sh OUTDIR MANIFEST NAME    ->  OUTDIR/NAME, with MANIFEST frozen in (a MicroPython manifest.py; it
#                                        should include("$(PORT_DIR)/variants/manifest.py") to keep the port's own)
# The source is unpacked once into OUTDIR/src and builds are incremental (a frozen rebuild after a firmware
# change takes seconds). Needs make and the i686 cross compiler with its C library (Debian: gcc-i686-linux-gnu
# and libc6-dev-i386-cross, which apt only recommends; both installed here when running as root). The program
# is linked against the cross C library's own loader (rpath), so the host needs no i386 multiarch libraries.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mkdir -p "$1" && cd "$1" && pwd)"
manifest="${2:-}"; name="${3:-micropython32}"
[[ -z "$manifest" || -n "${3:-}" ]] || { echo "usage: build.sh OUTDIR [MANIFEST NAME]" >&2; exit 2; }
src_tar="$here/micropython-src.tar.xz"
sum="$(sha256sum "$src_tar" | cut -d' ' -f1)"
cross_ok() {
  command -v i686-linux-gnu-gcc >/dev/null 2>&1 \
    && [[ -f "$(i686-linux-gnu-gcc -print-file-name=crt1.o)" ]] \
    && [[ -f "$(i686-linux-gnu-gcc -print-file-name=ld-linux.so.2)" ]]
}
if ! cross_ok; then
  if [[ "$(id -u)" == 0 ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      gcc-i686-linux-gnu libc6-dev-i386-cross make) >/dev/null
  else
    echo "micropython32: needs i686-linux-gnu-gcc and its C library" \
      "(apt-get install gcc-i686-linux-gnu libc6-dev-i386-cross)" >&2; exit 1
  fi
fi
loader="$(readlink -f "$(i686-linux-gnu-gcc -print-file-name=ld-linux.so.2)")"
if [[ ! -f "$out/src/.sha256" || "$(cat "$out/src/.sha256")" != "$sum" ]]; then
  rm -rf "$out/src" && mkdir -p "$out/src" && tar -xJf "$src_tar" -C "$out/src" && echo "$sum" > "$out/src/.sha256"
fi
make -s -C "$out/src/mpy-cross" -j"$(nproc)" >/dev/null 2>&1
args=(CROSS_COMPILE=i686-linux-gnu- MICROPY_PY_FFI=0 MICROPY_PY_BTREE=0
      "LDFLAGS_EXTRA=-Wl,--dynamic-linker=$loader -Wl,-rpath,$(dirname "$loader")")
if [[ -n "$manifest" ]]; then
  args+=(FROZEN_MANIFEST="$(cd "$(dirname "$manifest")" && pwd)/$(basename "$manifest")" BUILD="build-$name")
  bin="$out/src/ports/unix/build-$name/micropython"
else
  bin="$out/src/ports/unix/build-standard/micropython"
fi
make -s -C "$out/src/ports/unix" -j"$(nproc)" "${args[@]}" >"$out/$name.build.log" 2>&1 \
  || { tail -n 20 "$out/$name.build.log" >&2; exit 1; }
install -m 0755 "$bin" "$out/$name.tmp" && mv -f "$out/$name.tmp" "$out/$name"
"$out/$name" -c "import sys; assert sys.maxsize == 2**31 - 1; print('$name: 32-bit MicroPython', sys.version.split(';')[1].strip(), 'at $out/$name')"
