#!/usr/bin/env bash
# An aarch64 (Jetson-class) node joins an x86 mesh, as processes on loopback: an x86
# meshtune-bootstrap, two x86 `meshtune node`s and one aarch64 `meshtune node` run by qemu-user
# (binfmt), all from the bundled tiny model (fixtures/synthetic, --random-init), 3 rounds of
# 2 local steps, the last one a pure exchange. docker/scripts/check-join.sh then checks the
# rounds.jsonl files: all 3 deltas in every round, the aarch64 node among every round's
# contributors on every node, one start model and one final model hash.
# Needs the static aarch64 binaries from docker/build-arm64.sh (docker/context-arm64/bin).
# Prints how long the join took.
# Usage: docker/test-arm64-join.sh [ROUNDS]   (default 3); keeps its files in $OUT (a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
arm=docker/context-arm64/bin
[ -x "$arm/meshtune" ] || { echo "no $arm/meshtune: run docker/build-arm64.sh first" >&2; exit 1; }
case "$(file -b "$arm/meshtune")" in
  *"ARM aarch64"*) ;;
  *) echo "$arm/meshtune is not an aarch64 executable" >&2; exit 1 ;;
esac
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
  || { echo "qemu-aarch64 binfmt is not enabled: run docker/build-arm64.sh" >&2; exit 1; }
# The x86 side: the workspace's dev build (what `cargo test --workspace` already built in CI),
# or X86_BIN, a folder with meshtune and meshtune-bootstrap (e.g. a release build).
if [ -z "${X86_BIN:-}" ]; then
  cargo build -p meshtune-node -p meshtune-bootstrap
fi
x86="${X86_BIN:-$target_dir/debug}"

out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
echo "arm64 join: files in $out"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

"$x86/meshtune-bootstrap" --listen /ip4/127.0.0.1/tcp/0 --mesh arm64-join \
  --key-file "$out/bootstrap.key" > "$out/bootstrap.addr" 2> "$out/bootstrap.log" &
pids+=($!)
for _ in $(seq 100); do grep -q /tcp/ "$out/bootstrap.addr" 2>/dev/null && break; sleep 0.1; done
bootstrap="$(grep /tcp/ "$out/bootstrap.addr" | head -1)"
[ -n "$bootstrap" ] || { echo "bootstrap printed no address" >&2; exit 1; }

# A slow emulated node must not miss a round: long first deadline, and a floor under the
# adaptive one.
cat > "$out/node.toml" <<'EOF'
[node]
mesh = "arm64-join"
codec = "top10%+int8/64+zstd:1"
collect_timeout_s = 600
min_collect_timeout_s = 120
[train]
batch_size = 4
lr = 3e-3
warmup_steps = 0
schedule = "constant"
source_max_len = 48
target_max_len = 24
EOF
for i in 0 1 2; do
  sed -n "$((i * 24 + 1)),$(((i + 1) * 24))p" fixtures/synthetic/train.jsonl > "$out/shard$i.jsonl"
done

start=$(date +%s)
start_node() { # NAME BINARY SHARD
  "$2" node --random-init --model fixtures/synthetic --train "$out/shard$3.jsonl" \
    --out "$out/$1" --config "$out/node.toml" --no-quic --listen /ip4/127.0.0.1/tcp/0 \
    --bootstrap "$bootstrap" --rounds "$rounds" --local-steps 2 --final-exchange \
    --wait-for-peers 2 > /dev/null 2> "$out/$1.log" &
  pids+=($!)
}
start_node x86-a "$x86/meshtune" 0
start_node x86-b "$x86/meshtune" 1
start_node arm64 "$arm/meshtune" 2
failed=0
for i in 1 2 3; do wait "${pids[$i]}" || { echo "node $i failed" >&2; failed=1; }; done
elapsed=$(($(date +%s) - start))
if [ "$failed" = 1 ]; then tail -n 20 "$out"/*.log >&2; exit 1; fi

docker/scripts/check-join.sh "$rounds" "$out/arm64" "$out/x86-a" "$out/x86-b"
echo "arm64 join (processes, aarch64 node under qemu-user) took ${elapsed} s"
