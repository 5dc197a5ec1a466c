#!/usr/bin/env bash
# One command for a GPU machine (CUDA driver + runtime, no Rust needed): takes a `meshtune`
# built with `--features cuda` (and `meshtune-bootstrap` next to it) and, from the checkout's
# root, runs on the CUDA device:
#   1. parity against the committed HF fixtures: `score --json` per-example loss
#      (fixtures/models/{flan-odd,t5-relu-tied}, relative error <= SCORE_TOL, default 1e-3) and
#      `generate --json` greedy and beam-4 token ids (fixtures/models/flan-sharded-f16, exact),
#      as node/tests/cli_contract.rs does on CPU;
#   2. `bench forward` (f32) and `bench train` (f32 and bf16) for flan-t5-small and base with
#      `--compare-pytorch` (PyTorch eager on the same shape in the same run) and MFU against
#      the datasheet peak of the GPU (`--device-peak`, from nvidia-smi's name);
#   3. a 2-node mesh on loopback, both nodes on the GPU, bundled tiny model, 2 rounds (the
#      last a pure exchange): both must end on one model hash.
# Writes $OUT/gpu-check.json (every step's command, exit code, seconds and parsed output) and
# $OUT/gpu-check.md (the tables), and exits non-zero if a check failed.
#
# Usage: scripts/gpu-check.sh PATH/TO/meshtune [OUT]        (OUT defaults to gpu-check-out)
# Needs python3 with torch and transformers for the PyTorch columns
# (scripts/requirements-fixtures.txt). Budget: under 8 minutes on one H100 (not yet run on
# any GPU). Knobs (environment): DEVICE (cuda), PRESETS ("flan-t5-small flan-t5-base"),
# PRECISIONS ("f32 bf16"), BATCH (8), SRC_LEN (512), TGT_LEN (128), ITERS (5), DEVICE_PEAK
# (a name from `meshtune model info`'s peak table; default from nvidia-smi), STEP_TIMEOUT (240 s).
set -uo pipefail
cd "$(dirname "$0")/.."
bin="$(realpath "${1:?usage: scripts/gpu-check.sh PATH/TO/meshtune [OUT]}")"
out="$(realpath -m "${2:-gpu-check-out}")"
device="${DEVICE:-cuda}"
presets="${PRESETS-flan-t5-small flan-t5-base}"
precisions="${PRECISIONS-f32 bf16}"
batch="${BATCH:-8}" src="${SRC_LEN:-512}" tgt="${TGT_LEN:-128}" iters="${ITERS:-5}"
step_timeout="${STEP_TIMEOUT:-240}"
bootstrap_bin="$(dirname "$bin")/meshtune-bootstrap"
mkdir -p "$out/steps"
: > "$out/steps.tsv"

# run NAME CMD...: stdout to steps/NAME.out, stderr to steps/NAME.err; a line in steps.tsv.
run() {
  local name="$1"; shift
  local start end rc
  start=$(date +%s.%N)
  timeout "$step_timeout" "$@" > "$out/steps/$name.out" 2> "$out/steps/$name.err"
  rc=$?
  end=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN { print $end - $start }")" "$*" \
    >> "$out/steps.tsv"
  echo "$name: exit $rc"
}

gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
peak="${DEVICE_PEAK:-}"
if [ -z "$peak" ]; then
  case "$gpu_name" in
    *H200*) peak=h200-sxm ;;
    *H100*HBM3*|*H100*SXM*) peak=h100-sxm ;;
    *A100*SXM*|*A100-SXM*) peak=a100-sxm ;;
  esac
fi
peak_args=()
[ -n "$peak" ] && peak_args=(--device-peak "$peak")
started=$(date +%s)

# 1. Parity with transformers on the device.
for model in flan-odd t5-relu-tied; do
  run "score-$model" "$bin" score --device "$device" --model "fixtures/models/$model" \
    --data fixtures/samsum_tiny.jsonl --prefix "summarize: " --json
done
for mode in greedy:1 beam:4; do
  run "generate-${mode%%:*}" "$bin" generate --device "$device" \
    --model fixtures/models/flan-sharded-f16 --data fixtures/samsum_tiny.json \
    --prefix "summarize: " --max-new-tokens 20 --num-beams "${mode##*:}" --batch-size 5 --json
done

# 2. Throughput against PyTorch, same shapes, same run.
for preset in $presets; do
  run "forward-$preset-f32" "$bin" bench forward --device "$device" --preset "$preset" \
    --batch "$batch" --src-len "$src" --tgt-len "$tgt" --iters "$iters" --compare-pytorch --json
  for precision in $precisions; do
    run "train-$preset-$precision" "$bin" bench train --device "$device" --preset "$preset" \
      --precision "$precision" --batch "$batch" --src-len "$src" --tgt-len "$tgt" \
      --iters "$iters" "${peak_args[@]}" --compare-pytorch --json
  done
done

# 3. Two nodes on the GPU, one round of training and a final exchange.
mesh="$out/mesh"
rm -rf "$mesh" && mkdir -p "$mesh"
head -n 40 fixtures/synthetic/train.jsonl > "$mesh/shard0.jsonl"
sed -n 41,80p fixtures/synthetic/train.jsonl > "$mesh/shard1.jsonl"
"$bootstrap_bin" --listen /ip4/127.0.0.1/tcp/0 --mesh gpu-check \
  --key-file "$mesh/bootstrap.key" > "$mesh/bootstrap.addr" 2> "$mesh/bootstrap.log" &
bootstrap_pid=$!
for _ in $(seq 100); do grep -q /tcp/ "$mesh/bootstrap.addr" 2>/dev/null && break; sleep 0.1; done
addr="$(grep /tcp/ "$mesh/bootstrap.addr" | head -1)"
node_pids=()
for i in 0 1; do
  node_args=(node --device "$device" --random-init --model fixtures/synthetic
    --train "$mesh/shard$i.jsonl" --out "$mesh/node$i" --no-quic
    --listen /ip4/127.0.0.1/tcp/0 --bootstrap "$addr" --mesh gpu-check --rounds 2
    --local-steps 2 --final-exchange --wait-for-peers 1)
  run "mesh-node$i" "$bin" "${node_args[@]}" &
  node_pids+=($!)
done
wait "${node_pids[@]}"
kill "$bootstrap_pid" 2>/dev/null

python3 - "$out" "$gpu_name" "$peak" "$(($(date +%s) - started))" <<'EOF'
import json, os, pathlib, subprocess, sys

out, gpu, peak, total_s = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
fixtures = pathlib.Path("fixtures/models")
steps, checks = {}, []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds, command = line.split("\t", 3)
    steps[name] = {"exit": int(rc), "seconds": round(float(seconds), 1), "command": command,
                   "stdout": (out / "steps" / f"{name}.out").read_text(errors="replace")}

def lines(name):
    return [json.loads(l) for l in steps[name]["stdout"].splitlines() if l.startswith("{")]

def check(name, ok, detail):
    checks.append({"check": name, "ok": bool(ok), "detail": detail})

for model in ["flan-odd", "t5-relu-tied"]:
    name = f"score-{model}"
    want = json.loads((fixtures / model / "expected.json").read_text())["score"]
    got = lines(name) if steps[name]["exit"] == 0 else []
    rel = [abs(g["loss"] - w["loss"]) / w["loss"] for g, w in zip(got, want)
           if g["id"] == w["id"] and g["tokens"] == w["tokens"]]
    ok = len(rel) == len(want) and max(rel) <= float(os.environ.get("SCORE_TOL", "1e-3"))
    check(name, ok, f"{len(rel)}/{len(want)} examples, max relative loss error "
          f"{max(rel) if rel else float('nan'):.2e}")
expected = json.loads((fixtures / "flan-sharded-f16" / "expected.json").read_text())["generate"]
for mode in ["greedy", "beam"]:
    name = f"generate-{mode}"
    want = expected[mode]["results"]
    got = lines(name) if steps[name]["exit"] == 0 else []
    same = sum(g["id"] == w["id"] and g["token_ids"] == w["token_ids"] for g, w in zip(got, want))
    check(name, same == len(want) and len(got) == len(want), f"{same}/{len(want)} ids identical")

rows = []
for name, step in steps.items():
    if not (name.startswith("forward-") or name.startswith("train-")):
        continue
    result = lines(name)
    check(name, step["exit"] == 0 and result, f"exit {step['exit']}, {step['seconds']} s")
    if not result:
        continue
    by_engine = {r["engine"]: r for r in result[-1]["results"]}
    ours = next((r for e, r in by_engine.items() if e.startswith("meshtune")), None)
    torch = next((r for e, r in by_engine.items() if not e.startswith("meshtune")), None)
    rows.append({"bench": name, "meshtune_ms": ours and ours["ms_per_step"],
                 "pytorch_ms": torch and torch["ms_per_step"],
                 "meshtune_tokens_per_s": ours and ours["tokens_per_s"],
                 "meshtune_mfu": ours and ours.get("mfu"), "pytorch_mfu": torch and torch.get("mfu"),
                 "speed_vs_pytorch": ours and torch and torch["ms_per_step"] / ours["ms_per_step"]})

hashes = []
for i in range(2):
    records = out / "mesh" / f"node{i}" / "rounds.jsonl"
    last = records.read_text().splitlines()[-1] if records.exists() else "{}"
    hashes.append(json.loads(last).get("model_hash"))
check("mesh-2-nodes", all(steps[f"mesh-node{i}"]["exit"] == 0 for i in range(2))
      and hashes[0] and hashes[0] == hashes[1], f"final model hashes {hashes}")

try:
    version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True).stdout.strip()
except OSError:
    version = ""
report = {"gpu": gpu, "device_peak": peak or None, "torch": version, "total_seconds": total_s,
          "ok": all(c["ok"] for c in checks), "checks": checks, "bench": rows,
          "steps": {k: {x: v for x, v in s.items() if x != "stdout"} for k, s in steps.items()}}
(out / "gpu-check.json").write_text(json.dumps(report, indent=1))
fmt = lambda v, f: "-" if v is None else format(v, f)
pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
md = [f"# gpu-check: {gpu or 'unknown GPU'}, {total_s} s, torch {version or '-'}", "",
      "| check | ok | detail |", "|---|---|---|"]
md += [f"| {c['check']} | {'yes' if c['ok'] else 'NO'} | {c['detail']} |" for c in checks]
md += ["", f"| bench | meshtune ms/step | PyTorch ms/step | meshtune/PyTorch speed | tokens/s "
       f"| MFU meshtune | MFU PyTorch (peak: {peak or 'unknown'}) |", "|---|---|---|---|---|---|---|"]
md += [f"| {r['bench']} | {fmt(r['meshtune_ms'], '.1f')} | {fmt(r['pytorch_ms'], '.1f')} "
       f"| {fmt(r['speed_vs_pytorch'], '.2f')} | {fmt(r['meshtune_tokens_per_s'], '.0f')} "
       f"| {pct(r['meshtune_mfu'])} | {pct(r['pytorch_mfu'])} |" for r in rows]
(out / "gpu-check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if report["ok"] else 1)
EOF
