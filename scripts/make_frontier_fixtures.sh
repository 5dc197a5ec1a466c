#!/usr/bin/env bash
# Regenerates the compression frontier's fixtures (docs/BENCHMARKS.md, "Compression frontier"):
#   fixtures/potluck/{train,eval}.jsonl  the harder second task (meshtune_model::potluck)
#   fixtures/models/meetings-t5/         the bundled tiny T5 trained centrally on the bundled
#                                        meeting task (1200 steps), the fine-tuning workload's
#                                        starting point, stored in bf16
# The *.toml files next to the corpus are hand-written workload settings.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p meshtune-node
bin=target/release/meshtune
$bin data potluck --out fixtures/potluck
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/train.toml" <<'TOML'
batch_size = 16
lr = 2e-3
warmup_steps = 50
schedule = "linear"
source_max_len = 128
target_max_len = 48
eval_every = 300
eval_examples = 100
eval_max_new_tokens = 48
checkpoint_every = 300
seed = 11
TOML
$bin train --model fixtures/synthetic --random-init --train fixtures/synthetic/train.jsonl \
  --eval fixtures/synthetic/eval.jsonl --out "$work/run" --steps 1200 --config "$work/train.toml"
$bin model export --model "$work/run/final" --out fixtures/models/meetings-t5 --dtype bf16
cp fixtures/synthetic/tokenizer.json fixtures/models/meetings-t5/
