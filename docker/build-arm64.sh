#!/usr/bin/env bash
# Cross-builds `meshtune` and `meshtune-bootstrap` for aarch64-unknown-linux-gnu (the target of
# an NVIDIA Jetson, JetPack 6) on an x86_64 Debian/Ubuntu machine, static (glibc, crt-static)
# like the x86 image, and makes this machine able to run them under qemu-user:
#   1. apt: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross (the static libc), qemu-user-static,
#      binfmt-support, file; only what is missing is installed;
#   2. `rustup target add aarch64-unknown-linux-gnu`;
#   3. binfmt_misc mounted and qemu-aarch64 enabled, so an aarch64 binary runs directly;
#   4. `cargo build --release --target aarch64-unknown-linux-gnu` (CPU backend; pass
#      `--features cuda` as the first argument for the CUDA backend, which needs no toolkit);
#   5. checks that `file` says "ARM aarch64" and "statically linked", then copies both binaries
#      to docker/context-arm64/bin/.
# Usage: docker/build-arm64.sh [--features cuda]
# Needs root for steps 1 and 3 (skipped when already done). Heavy: run it under `nice -n 10`
# on a shared machine. Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
out=docker/context-arm64/bin

install_packages() {
  local missing=()
  command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
  [ -e /usr/aarch64-linux-gnu/lib/libc.a ] || missing+=(libc6-dev-arm64-cross)
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  command -v file >/dev/null || missing+=(file)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

enable_binfmt() {
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64
  fi
  grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64
}

install_packages
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
enable_binfmt

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# Only the target's rustflags: build scripts and proc macros stay dynamic host programs.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
start=$(date +%s)
cargo build --release --target "$target" -p meshtune-node -p meshtune-bootstrap "$@"
echo "cross-build took $(($(date +%s) - start)) s"

mkdir -p "$out"
for bin in meshtune meshtune-bootstrap; do
  cp "$target_dir/$target/release/$bin" "$out/"
  description="$(file -b "$out/$bin")"
  echo "$bin: $description"
  case "$description" in
    *"ARM aarch64"*"statically linked"* | *"ARM aarch64"*"static-pie linked"*) ;;
    *) echo "error: $out/$bin is not a static ARM aarch64 executable" >&2; exit 1 ;;
  esac
done
"$out/meshtune" --version
