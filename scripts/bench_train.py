"""PyTorch eager baseline for `meshtune bench train`.

Builds T5ForConditionalGeneration from the same config.json (random weights) and times the
identical optimizer step meshtune times: forward with labels (teacher forcing, mean token
cross-entropy), backward, global-norm clipping at 1.0, torch AdamW (lr 1e-4, betas 0.9/0.999,
eps 1e-8, no weight decay), on the same shapes of random token ids. `--lora` trains rank-8
adapters (alpha 16) on q and v of every attention, written out here (no peft needed) as
meshtune does it. `--precision bf16|fp16` runs the step under autocast with fp32 master
weights (fp16 with a GradScaler), the scheme meshtune uses.

Prints one JSON line: {"ms_per_step", "torch", "threads", "peak_rss_mib"}.
    python scripts/bench_train.py --config CONFIG.json --batch 8 --src-len 512 --tgt-len 128
"""

import argparse
import json
import resource
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration


class LoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.a.t() @ self.b.t()) * self.scale


def attach_lora(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        if type(module).__name__ == "T5Attention":
            module.q = LoraLinear(module.q)
            module.v = LoraLinear(module.v)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=512)
    p.add_argument("--tgt-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="f32", choices=["f32", "bf16", "fp16"])
    p.add_argument("--lora", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(args.config) as f:
        config = T5Config(**json.load(f))
    model = T5ForConditionalGeneration(config).to(args.device).train()
    if args.lora:
        attach_lora(model)
        model.to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = lambda n: torch.randint(2, config.vocab_size - 1, (args.batch, n), device=args.device)
    input_ids, labels = ids(args.src_len), ids(args.tgt_len)
    mask = torch.ones_like(input_ids)
    dtype = {"f32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    scaler = torch.amp.GradScaler(device_type, enabled=args.precision == "fp16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        loss.item()

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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "ms_per_step": ms,
        "torch": torch.__version__.split("+")[0],
        "threads": args.threads,
        "peak_rss_mib": peak if device_type == "cpu" else None,
    }))


if __name__ == "__main__":
    main()
