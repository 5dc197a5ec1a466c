"""PyTorch eager baseline for `meshtune bench forward`.

Builds T5ForConditionalGeneration from the same config.json meshtune benchmarks (random
weights), runs the identical forward pass (encoder + teacher-forced decoder, full logits) and
prints one JSON line: {"ms_per_step", "torch", "threads"}.

Called by `meshtune bench forward --compare-pytorch`; can be run alone:
    python scripts/bench_forward.py --config CONFIG.json --batch 8 --src-len 512 --tgt-len 128
"""

import argparse
import json
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=512)
    p.add_argument("--tgt-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(args.config) as f:
        config = T5Config(**json.load(f))
    dtype = getattr(torch, args.dtype)
    model = T5ForConditionalGeneration(config).to(args.device, dtype).eval()
    ids = lambda n: torch.randint(2, config.vocab_size - 1, (args.batch, n), device=args.device)
    input_ids, decoder_ids = ids(args.src_len), ids(args.tgt_len)
    mask = torch.ones_like(input_ids)

    def step() -> None:
        with torch.inference_mode():
            out = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids)
            out.logits.sum().item()

    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / args.iters * 1e3
    print(json.dumps({"ms_per_step": ms, "torch": torch.__version__.split("+")[0], "threads": args.threads}))


if __name__ == "__main__":
    main()
