#!/usr/bin/env bash
# Checks what an aarch64 node's join must show, from the nodes' rounds.jsonl files:
#   check-join.sh ROUNDS ARM_DIR OTHER_DIR...   (each DIR holds a node's rounds.jsonl)
# - every node applied ROUNDS rounds, each combining one delta per node;
# - every round's `contributors` (peer ids whose deltas were combined) name the aarch64 node,
#   on every node: the x86 nodes aggregated its deltas;
# - all nodes started from one model (round 0's `base_hash`) and end on one `model_hash`.
set -euo pipefail
rounds="${1:?rounds}"; arm="${2:?arm64 node dir}"; shift 2
nodes=("$arm" "$@")
field() { sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p" <<< "$1"; }
arm_id="$(field "$(head -1 "$arm/rounds.jsonl")" peer_id)"
[ -n "$arm_id" ] || { echo "no peer id in $arm/rounds.jsonl" >&2; exit 1; }
finals=() bases=()
for node in "${nodes[@]}"; do
  records="$node/rounds.jsonl"
  [ "$(wc -l < "$records")" = "$rounds" ] || { echo "$node: not $rounds rounds" >&2; exit 1; }
  while read -r line; do
    grep -q "\"deltas\":${#nodes[@]}," <<< "$line" \
      || { echo "$node combined fewer than ${#nodes[@]} deltas: $line" >&2; exit 1; }
    contributors="$(sed -n 's/.*"contributors":\[\([^]]*\)\].*/\1/p' <<< "$line")"
    grep -q "\"$arm_id\"" <<< "$contributors" \
      || { echo "$node did not aggregate the aarch64 node's delta: $line" >&2; exit 1; }
  done < "$records"
  bases+=("$(field "$(head -1 "$records")" base_hash)")
  finals+=("$(field "$(tail -1 "$records")" model_hash)")
done
for i in "${!nodes[@]}"; do
  [ "${bases[$i]}" = "${bases[0]}" ] \
    || { echo "nodes started from different models: ${bases[*]}" >&2; exit 1; }
  [ "${finals[$i]}" = "${finals[0]}" ] \
    || { echo "nodes ended on different models: ${finals[*]}" >&2; exit 1; }
done
echo "join ok: ${#nodes[@]} nodes (aarch64 $arm_id), $rounds rounds, every round combined" \
  "every node's delta, one start model ${bases[0]:0:16}, one final model ${finals[0]:0:16}"
