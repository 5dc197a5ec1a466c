#!/usr/bin/env bash
# Builds the meshtune CPU image FROM scratch:
#   1. static binaries (x86_64 glibc with crt-static; no musl toolchain needed),
#   2. the bundled tiny model config, tokenizer and synthetic data, split non-IID into shards,
#   3. a bootstrap identity, whose peer id goes into docker/.env for the compose file,
#   4. `docker build -t meshtune:cpu`.
# Usage: docker/build.sh [NODES]   (default 3 shards)
set -euo pipefail
cd "$(dirname "$0")/.."
nodes="${1:-3}"
target=x86_64-unknown-linux-gnu
ctx=docker/context
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --target "$target" -p meshtune-node -p meshtune-bootstrap -p meshtune-testnet
rm -rf "$ctx" && mkdir -p "$ctx/bin" "$ctx/data"
for bin in meshtune meshtune-bootstrap meshtune-testnet; do
  cp "target/$target/release/$bin" "$ctx/bin/"
  if ! ldd "$ctx/bin/$bin" 2>&1 | grep -Eq "statically linked|not a dynamic executable"; then
    echo "error: $bin is not static" >&2; exit 1
  fi
done
meshtune="$ctx/bin/meshtune"
cp fixtures/synthetic/{config.json,tokenizer.json,train.jsonl,eval.jsonl} "$ctx/data/"
head -n 24 fixtures/synthetic/eval.jsonl > "$ctx/data/eval-small.jsonl"
"$meshtune" data split --input "$ctx/data/train.jsonl" --nodes "$nodes" \
  --strategy dirichlet --alpha 0.5 --out "$ctx/data/shards" >/dev/null  # node-000.jsonl, ...
# A bootstrap identity made now, so the compose file can name the bootstrap's peer id.
"$ctx/bin/meshtune-bootstrap" --listen /ip4/127.0.0.1/tcp/0 --key-file "$ctx/bootstrap.key" \
  > "$ctx/bootstrap.addr" 2>/dev/null &
pid=$!
for _ in $(seq 50); do [ -s "$ctx/bootstrap.addr" ] && break; sleep 0.1; done
kill "$pid"; wait "$pid" 2>/dev/null || true
peer_id="$(head -1 "$ctx/bootstrap.addr" | sed 's#.*/p2p/##')"
echo "BOOTSTRAP_PEER_ID=$peer_id" > docker/.env
cp docker/Dockerfile "$ctx/Dockerfile"
docker build -t meshtune:cpu "$ctx"
echo "built meshtune:cpu; bootstrap peer id $peer_id (in docker/.env)"
