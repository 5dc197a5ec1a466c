#!/usr/bin/env bash
# The compose testnet end to end: build the image, run a bootstrap and 3 nodes, SIGKILL node-2
# after its second round, start it again, and check that every node finishes every round and
# that all end on the same model (the last round is a pure exchange). The other two run on
# without node-2 (a round takes under a second here), so it usually comes back to a mesh that
# is rounds ahead or already done: it adopts their state and its last record is a catch-up.
# It must come back before they stop serving (5 s after their last round).
set -euo pipefail
cd "$(dirname "$0")"
rounds="${ROUNDS:-8}"
./build.sh 3
export ROUNDS="$rounds"
if docker compose version >/dev/null 2>&1; then
  compose() { docker compose -p meshtune -f compose.yml "$@"; }
else
  compose() { docker-compose -p meshtune -f compose.yml "$@"; }
fi
container_of() {
  docker ps -aq --filter label=com.docker.compose.project=meshtune \
    --filter "label=com.docker.compose.service=$1" | head -1
}
compose down -v --remove-orphans >/dev/null 2>&1 || true
rm -rf state && mkdir -p state/node-0 state/node-1 state/node-2
trap 'compose logs --no-color > state/compose.log 2>&1 || true; compose down -v >/dev/null 2>&1 || true' EXIT
compose up -d
rounds_of() { [ -f "state/$1/rounds.jsonl" ] && wc -l < "state/$1/rounds.jsonl" || echo 0; }
for _ in $(seq 600); do [ "$(rounds_of node-2)" -ge 2 ] && break; sleep 0.5; done
[ "$(rounds_of node-2)" -ge 2 ] || { echo "node-2 never applied 2 rounds" >&2; exit 1; }
scripts/fault.sh kill node-2
echo "killed node-2 after $(rounds_of node-2) rounds"
sleep 1
scripts/fault.sh restart node-2
for node in node-0 node-1 node-2; do
  code="$(docker wait "$(container_of "$node")")"
  [ "$code" = 0 ] || { echo "$node exited with $code" >&2; exit 1; }
done
hashes=()
for node in node-0 node-1 node-2; do
  last="$(tail -1 "state/$node/rounds.jsonl")"
  round="$(echo "$last" | sed 's/.*"round":\([0-9]*\).*/\1/')"
  [ "$round" = "$((rounds - 1))" ] || { echo "$node stopped at round $round" >&2; exit 1; }
  hashes+=("$(echo "$last" | sed 's/.*"model_hash":"\([0-9a-f]*\)".*/\1/')")
done
[ "${hashes[0]}" = "${hashes[1]}" ] && [ "${hashes[1]}" = "${hashes[2]}" ] \
  || { echo "nodes ended on different models: ${hashes[*]}" >&2; exit 1; }
echo "compose testnet ok: 3 nodes, $rounds rounds, node-2 killed and restarted, one final model ${hashes[0]:0:16}"

# The testnet's docker mode on the same image: 4 containers on lte-shaped links, split in two
# halves for part of the run, then healed. Every node must finish every round; whether the
# halves ended on one model is printed (the netns test in testnet/tests asserts it; here the
# halves' pace depends on the engine's scheduling, so the last rounds can still differ).
out="$(mktemp -d)"
../target/x86_64-unknown-linux-gnu/release/meshtune-testnet --mode docker --nodes 4 --rounds 10 \
  --local-steps 4 --examples-per-node 40 --eval-examples 4 --batch-size 4 \
  --scenario partition --link lte --no-compare --out "$out/run"
summary="$out/run/report/summary.md"
grep -q 'partition healed' "$summary" && grep -q '4 of 4 nodes applied the last round' "$summary" \
  || { cat "$summary" >&2; echo "docker-mode partition run incomplete" >&2; exit 1; }
left="$(docker ps -aq --filter "name=mtnet")"
[ -z "$left" ] || { echo "docker-mode containers left behind: $left" >&2; exit 1; }
echo "testnet --mode docker ok: $(grep -o 'reconverged\|not reconverged' "$summary" | head -1) after the partition healed"
