#!/usr/bin/env python3
"""Writes fixtures/train_parity/: a per-step reference for the Rust training loop.

Two short fine-tuning runs of the tiny `fixtures/models/flan-odd` model on the 12 records of
`fixtures/samsum_tiny.jsonl`, done with Hugging Face transformers + torch in fp32 on the CPU:

    fixtures/train_parity/full.json             full fine-tuning (every parameter trained)
    fixtures/train_parity/lora.json             LoRA (rank 4, alpha 8, q and v of every attention)
    fixtures/train_parity/adafactor.json        full fine-tuning with HF transformers' Adafactor
                                                (factored second moments, no first moment,
                                                scale_parameter=True, relative_step=False)
    fixtures/train_parity/lora_init.safetensors the initial LoRA A and B matrices (f32), keys
                                                `<hf module path>.lora_A.weight` / `.lora_B.weight`

Both runs use the same data, order, optimizer and schedule; every setting is written into the JSON
files so the Rust test reads them instead of hard-coding them:

  * source = "summarize: " + dialogue, target = summary, tokenized with the model folder's
    tokenizer.json through the `tokenizers` library (post-processor appends `</s>`), truncated with
    `Tokenizer.enable_truncation(64)` / `(24)`, which keeps the final `</s>` (checked below).
  * 20 optimizer steps; each step = 2 micro-batches (gradient accumulation 2) of 3 examples. The order
    comes from `random.Random(1234)`: every epoch (= 2 steps = 12 examples) the list [0..12) in file
    order is shuffled afresh with `rng.shuffle`, split into 6 + 6 for the two steps, and each 6 into
    3 + 3 for the micro-batches. The record ids are stored per step and micro-batch.
  * Each micro-batch is right-padded to its own longest source / target (pad 0, attention_mask,
    labels padded with -100); the model shifts the labels right itself (`labels=` only).
  * micro-batch loss = HF `outputs.loss` (mean over the non-(-100) label tokens of that micro-batch);
    backward on loss / 2; step loss = loss_0 / 2 + loss_1 / 2 (computed in Python floats).
  * `torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)`; the pre-clip norm is logged.
  * `torch.optim.AdamW(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, foreach=False)`, weight decay 0.01 for
    parameters with ndim >= 2 and 0.0 for the 1-D ones (T5's layer-norm weights);
    `transformers.get_linear_schedule_with_warmup(opt, 3, 20)` (LambdaLR; the first step has lr 0).
    Per step: lr read from param_groups[0] -> optimizer.step() -> scheduler.step() ->
    zero_grad(set_to_none=True).
  * The model is loaded with `T5ForConditionalGeneration.from_pretrained(dir, dtype=torch.float32,
    attn_implementation="eager")` and put in train mode; its dropout rate is 0.0 (asserted), so train
    mode is deterministic. The forward passes use `use_cache=False` (no effect on the numbers).
  * LoRA is implemented here with PEFT's math (no peft dependency): y = W x + B(A x) * (alpha / r),
    A [r, in] initialised with `kaiming_uniform_(a=sqrt(5))` from a seeded torch.Generator, B [out, r]
    zeros, base weights frozen, A and B trained (2-D, so weight decay 0.01 applies).

Usage (from the repository root, a few seconds on one core):

    python scripts/make_train_fixture.py

The script is deterministic (fixed seeds, one thread, no clock): running it twice with the pinned
versions (scripts/requirements-fixtures.txt) gives byte-identical files.
"""

import json
import math
import os
import pathlib
import platform
import random
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import T5ForConditionalGeneration, get_linear_schedule_with_warmup  # noqa: E402
from transformers.optimization import Adafactor  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
MODEL_NAME = "flan-odd"
MODEL_DIR = FIX / "models" / MODEL_NAME
DATA_PATH = FIX / "samsum_tiny.jsonl"
OUT = FIX / "train_parity"

PREFIX = "summarize: "
SOURCE_MAX_LEN = 64
TARGET_MAX_LEN = 24
PAD_ID = 0
EOS_ID = 1
LABEL_PAD = -100

STEPS_TOTAL = 20
GRAD_ACCUM = 2
MICRO_BATCH = 3
ORDER_SEED = 1234

LR = 2e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
WARMUP = 3
MAX_GRAD_NORM = 1.0

# Adafactor as T5 fine-tuning recipes use it: external lr (our schedule), parameter-scaled steps.
ADAFACTOR = {
    "lr": 1e-2,
    "eps": (1e-30, 1e-3),
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "beta1": None,
    "weight_decay": 0.0,
    "scale_parameter": True,
    "relative_step": False,
    "warmup_init": False,
}

LORA_RANK = 4
LORA_ALPHA = 8
LORA_DROPOUT = 0.0
LORA_TARGETS = ["q", "v"]
LORA_INIT_SEED = 4321


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_records():
    with open(DATA_PATH, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    assert len(recs) == 12, len(recs)
    return recs


def tokenize_records(recs):
    """Source / target ids per record, truncated by the tokenizers library (keeps the final </s>)."""
    src_tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tgt_tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    full_tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    assert src_tok.truncation is None and src_tok.padding is None
    src_tok.enable_truncation(SOURCE_MAX_LEN)
    tgt_tok.enable_truncation(TARGET_MAX_LEN)
    assert src_tok.token_to_id("<pad>") == PAD_ID and src_tok.token_to_id("</s>") == EOS_ID
    out = []
    n_trunc = {"source": 0, "target": 0}
    for row, r in enumerate(recs):
        item = {"row": row, "id": r["id"]}
        for kind, tok, text, max_len in (
            ("source", src_tok, PREFIX + r["dialogue"], SOURCE_MAX_LEN),
            ("target", tgt_tok, r["summary"], TARGET_MAX_LEN),
        ):
            ids = tok.encode(text).ids
            full = full_tok.encode(text).ids
            assert full[-1] == EOS_ID and EOS_ID not in full[:-1]
            # enable_truncation reserves room for the post-processor's </s>: the result is the first
            # max_len - 1 content ids followed by </s>.
            assert ids[-1] == EOS_ID, (r["id"], kind, ids)
            if len(full) > max_len:
                n_trunc[kind] += 1
                assert len(ids) == max_len and ids[:-1] == full[: max_len - 1], (r["id"], kind)
            else:
                assert ids == full
            item[f"{kind}_ids"] = ids
        out.append(item)
    assert n_trunc["source"] >= 1 and n_trunc["target"] >= 1, n_trunc
    return out


def build_order():
    """steps[i] = [micro_batch_0_rows, micro_batch_1_rows] (0-based rows of samsum_tiny.jsonl)."""
    rng = random.Random(ORDER_SEED)
    per_step = GRAD_ACCUM * MICRO_BATCH
    steps_per_epoch = 12 // per_step
    assert 12 % per_step == 0 and STEPS_TOTAL % steps_per_epoch == 0
    steps = []
    for _epoch in range(STEPS_TOTAL // steps_per_epoch):
        perm = list(range(12))
        rng.shuffle(perm)
        for s in range(steps_per_epoch):
            chunk = perm[s * per_step : (s + 1) * per_step]
            steps.append([chunk[m * MICRO_BATCH : (m + 1) * MICRO_BATCH] for m in range(GRAD_ACCUM)])
    assert len(steps) == STEPS_TOTAL
    return steps


def collate(examples, rows):
    """Right-pads one micro-batch to its own longest source / target."""
    src = [examples[i]["source_ids"] for i in rows]
    tgt = [examples[i]["target_ids"] for i in rows]
    ls, lt = max(map(len, src)), max(map(len, tgt))
    input_ids = torch.tensor([s + [PAD_ID] * (ls - len(s)) for s in src], dtype=torch.int64)
    attention_mask = torch.tensor([[1] * len(s) + [0] * (ls - len(s)) for s in src], dtype=torch.int64)
    labels = torch.tensor([t + [LABEL_PAD] * (lt - len(t)) for t in tgt], dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def check_against_model_fixture(examples):
    """The first 4 records must tokenize exactly like fixtures/models/flan-odd/expected.safetensors."""
    exp = load_file(str(MODEL_DIR / "expected.safetensors"))
    b = collate(examples, [0, 1, 2, 3])
    ls, lt = b["input_ids"].shape[1], b["labels"].shape[1]
    assert torch.equal(exp["input_ids"][:, :ls], b["input_ids"]) and not exp["attention_mask"][:, ls:].any()
    assert torch.equal(exp["attention_mask"][:, :ls], b["attention_mask"])
    assert torch.equal(exp["labels"][:, :lt], b["labels"]) and (exp["labels"][:, lt:] == LABEL_PAD).all()
    return json.loads((MODEL_DIR / "expected.json").read_text())["batch_loss"], b


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def load_model():
    model = T5ForConditionalGeneration.from_pretrained(
        str(MODEL_DIR), dtype=torch.float32, attn_implementation="eager"
    )
    cfg = model.config
    assert cfg.dropout_rate == 0.0, cfg.dropout_rate
    assert not cfg.scale_decoder_outputs
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr(), "lm_head must stay untied"
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    assert model.decoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    n_drop = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Dropout):
            assert mod.p == 0.0, (name, mod.p)
            n_drop += 1
        if type(mod).__name__ == "T5Attention":
            assert mod.dropout == 0.0, (name, mod.dropout)  # p of the functional dropout on attn weights
    assert n_drop > 0
    model.train()
    return model


def param_norms(model, rename=lambda k: k):
    """L2 norm (computed in f64) of every tensor of the HF state dict, including the embed_tokens aliases
    (LoRA A / B excluded)."""
    return {
        rename(k): float(torch.linalg.vector_norm(v.detach().double()))
        for k, v in sorted(model.state_dict().items(), key=lambda kv: rename(kv[0]))
        if ".lora_A." not in k and ".lora_B." not in k
    }


class LoraLinear(torch.nn.Module):
    """PEFT's lora.Linear forward for one adapter, dropout 0 (nn.Identity in PEFT):
    result = base_layer(x); result = result + lora_B(lora_A(dropout(x))) * scaling."""

    def __init__(self, base, rank, alpha, generator):
        super().__init__()
        self.base_layer = base
        self.scaling = alpha / rank
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        with torch.no_grad():
            # PEFT LoraLayer.reset_lora_parameters(init_lora_weights=True)
            torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            torch.nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        result = self.base_layer(x)
        return result + self.lora_B(self.lora_A(x)) * self.scaling


def lora_target_paths(model):
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS and name != "lm_head"
    ]


def apply_lora(model):
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(LORA_INIT_SEED)
    paths = lora_target_paths(model)
    for path in paths:
        parent_path, attr = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, LoraLinear(getattr(parent, attr), LORA_RANK, LORA_ALPHA, g))
    # every attention: encoder self, decoder self and decoder cross (EncDecAttention), q and v
    n_att = model.config.num_layers + 2 * model.config.num_decoder_layers
    assert len(paths) == 2 * n_att, paths
    assert sum(".EncDecAttention." in p for p in paths) == 2 * model.config.num_decoder_layers
    return paths


def lora_tensors(model, paths):
    out = {}
    for path in paths:
        m = model.get_submodule(path)
        out[f"{path}.lora_A.weight"] = m.lora_A.weight.detach().clone().contiguous()
        out[f"{path}.lora_B.weight"] = m.lora_B.weight.detach().clone().contiguous()
    return dict(sorted(out.items()))


def base_key(k):
    """State-dict key of a LoRA-wrapped model -> the HF key of the base weight."""
    return k.replace(".base_layer.", ".")


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def forward_loss(model, batch):
    return model(**batch, use_cache=False).loss


def make_optimizer(model, kind="adamw"):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if kind == "adafactor":
        opt = Adafactor([p for _, p in named], **ADAFACTOR)
        sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=STEPS_TOTAL)
        return opt, sched, [p for _, p in named], [], []
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named if p.ndim < 2]
    groups = [{"params": [p for _, p in decay], "weight_decay": WEIGHT_DECAY}]
    if no_decay:
        groups.append({"params": [p for _, p in no_decay], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=False)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=STEPS_TOTAL)
    return opt, sched, [p for _, p in named], [n for n, _ in decay], [n for n, _ in no_decay]


def run(model, examples, order, kind="adamw"):
    opt, sched, trainable, decay_names, no_decay_names = make_optimizer(model, kind)
    assert len({id(p) for p in trainable}) == len(trainable)

    with torch.no_grad():
        init_micro = [float(forward_loss(model, collate(examples, mb))) for mb in order[0]]
    initial = {
        "initial_batch_loss": sum(m / GRAD_ACCUM for m in init_micro),
        "initial_micro_losses": init_micro,
    }

    steps = []
    for step_rows in order:
        lr = opt.param_groups[0]["lr"]
        assert all(g["lr"] == lr for g in opt.param_groups)
        micro = []
        for rows in step_rows:
            loss = forward_loss(model, collate(examples, rows))
            (loss / GRAD_ACCUM).backward()
            micro.append(float(loss.detach()))
        total_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=MAX_GRAD_NORM)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps.append(
            {
                "micro_batches": [[examples[i]["id"] for i in rows] for rows in step_rows],
                "micro_batch_rows": [list(rows) for rows in step_rows],
                "loss": sum(m / GRAD_ACCUM for m in micro),
                "micro_losses": micro,
                "grad_norm": float(total_norm),
                "lr": float(lr),
            }
        )
    return initial, steps, decay_names, no_decay_names


def eval_batch(examples):
    return collate(examples, list(range(len(examples))))


def settings_json(examples):
    return {
        "model": MODEL_NAME,
        "model_dir": "fixtures/models/" + MODEL_NAME,
        "data": "fixtures/samsum_tiny.jsonl",
        "dtype": "float32",
        "attn_implementation": "eager",
        "train_mode": True,
        "dropout_rate": 0.0,
        "prefix": PREFIX,
        "source_max_len": SOURCE_MAX_LEN,
        "target_max_len": TARGET_MAX_LEN,
        "truncation": "tokenizers Tokenizer.enable_truncation(max_len): first max_len-1 ids then </s>",
        "pad_id": PAD_ID,
        "label_pad_id": LABEL_PAD,
        "padding": "per micro-batch, right, to the longest source / target of that micro-batch",
        "decoder_input_ids": "HF _shift_right(labels): start 0, labels[:-1], -100 -> 0; no decoder attention mask",
        "steps_total": STEPS_TOTAL,
        "grad_accum": GRAD_ACCUM,
        "micro_batch": MICRO_BATCH,
        "order": {
            "kind": "python random.Random(seed); per epoch rng.shuffle(list(range(12))) afresh, "
            "split into steps of grad_accum*micro_batch, then micro-batches of micro_batch",
            "seed": ORDER_SEED,
            "epoch_examples": 12,
        },
        "loss": "micro loss = mean CE over non-(-100) labels of the micro-batch; backward on loss/grad_accum; "
        "step loss = sum(micro_loss/grad_accum)",
        "optimizer": {
            "kind": "torch.optim.AdamW",
            "lr": LR,
            "betas": list(BETAS),
            "eps": EPS,
            "weight_decay": WEIGHT_DECAY,
            "no_decay": "ndim<2",
            "amsgrad": False,
            "foreach": False,
        },
        "schedule": {"kind": "linear", "warmup": WARMUP, "total": STEPS_TOTAL},
        "max_grad_norm": MAX_GRAD_NORM,
        "clip": {"norm_type": 2.0, "eps": 1e-6, "coef": "min(max_norm / (total_norm + 1e-6), 1)"},
        "examples": examples,
    }


def train_full(examples, order, versions):
    model = load_model()
    init_norms = param_norms(model)
    initial, steps, decay_names, no_decay_names = run(model, examples, order)
    assert no_decay_names and all(n.endswith("layer_norm.weight") for n in no_decay_names), no_decay_names
    model.eval()
    with torch.no_grad():
        final_eval = float(forward_loss(model, eval_batch(examples)))
    js = settings_json(examples)
    js.update(initial)
    js["trainable"] = "all parameters (shared.weight once: encoder/decoder.embed_tokens alias it; lm_head untied)"
    js["no_decay_params"] = no_decay_names
    js["steps"] = steps
    js["final_eval_loss"] = final_eval
    js["final_eval_rows"] = list(range(len(examples)))
    js["initial_param_norms"] = init_norms
    js["final_param_norms"] = param_norms(model)
    js["versions"] = versions
    return js


def train_adafactor(examples, order, versions):
    model = load_model()
    initial, steps, _, _ = run(model, examples, order, "adafactor")
    model.eval()
    with torch.no_grad():
        final_eval = float(forward_loss(model, eval_batch(examples)))
    js = settings_json(examples)
    js.update(initial)
    js["optimizer"] = {
        "kind": "transformers.optimization.Adafactor",
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in ADAFACTOR.items()},
        "factored": "parameters with ndim >= 2 (row/col means of grad^2 + eps[0]); others a full second moment",
    }
    js["trainable"] = "all parameters"
    js["steps"] = steps
    js["final_eval_loss"] = final_eval
    js["final_param_norms"] = param_norms(model)
    js["versions"] = versions
    return js


def train_lora(examples, order, versions):
    model = load_model()
    base_norms = param_norms(model)
    # the frozen base model's loss on each step's micro-batches (no_grad, train mode): how far the LoRA
    # updates move the loss, i.e. how sensitive a loss comparison is to the adapter training at all
    with torch.no_grad():
        untrained = [sum(float(forward_loss(model, collate(examples, mb))) / GRAD_ACCUM for mb in st) for st in order]
        model.eval()
        untrained_eval = float(forward_loss(model, eval_batch(examples)))
        model.train()
    paths = apply_lora(model)
    model.train()
    init = lora_tensors(model, paths)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(init), sorted(trainable ^ set(init))
    initial, steps, decay_names, no_decay_names = run(model, examples, order)
    assert not no_decay_names and set(decay_names) == set(init)
    model.eval()
    batch = eval_batch(examples)
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    final_eval = float(out.loss)
    final = lora_tensors(model, paths)

    # merge check: a fresh base model with W + (alpha / r) * B @ A (PEFT's get_delta_weight / merge)
    merged = load_model()
    merged.eval()
    scaling = LORA_ALPHA / LORA_RANK
    merged_norms = {}
    with torch.no_grad():
        for path in paths:
            w = merged.get_submodule(path).weight
            w += (final[f"{path}.lora_B.weight"] @ final[f"{path}.lora_A.weight"]) * scaling
            merged_norms[f"{path}.weight"] = float(torch.linalg.vector_norm(w.double()))
        mout = merged(**batch, use_cache=False)
    merged_diff = float((mout.logits - out.logits).abs().max())
    assert merged_diff < 1e-4, merged_diff

    final_base = param_norms(model, rename=base_key)
    assert final_base == base_norms, "LoRA run changed a frozen weight"

    js = settings_json(examples)
    js.update(initial)
    js["lora"] = {
        "rank": LORA_RANK,
        "alpha": LORA_ALPHA,
        "dropout": LORA_DROPOUT,
        "targets": LORA_TARGETS,
        "scaling": scaling,
        "formula": "y = W x + (B (A x)) * (alpha / rank); A [rank, in], B [out, rank]",
        "init": "A: kaiming_uniform_(a=sqrt(5)) from torch.Generator().manual_seed(seed) in module order; B: zeros; "
        "stored in lora_init.safetensors",
        "init_seed": LORA_INIT_SEED,
        "init_file": "fixtures/train_parity/lora_init.safetensors",
        "modules": paths,
    }
    js["trainable"] = "lora_A / lora_B only; every base weight frozen"
    js["no_decay_params"] = no_decay_names
    js["steps"] = steps
    js["final_eval_loss"] = final_eval
    js["final_eval_rows"] = list(range(len(examples)))
    js["untrained_step_losses"] = untrained
    js["untrained_eval_loss"] = untrained_eval
    js["final_param_norms"] = final_base
    js["initial_lora_norms"] = {k: float(torch.linalg.vector_norm(v.double())) for k, v in init.items()}
    js["final_lora_norms"] = {k: float(torch.linalg.vector_norm(v.double())) for k, v in final.items()}
    js["merged_check"] = {
        "batch": "the final eval batch (all 12 rows, one padded batch, eval mode)",
        "formula": "W_merged = W + (alpha / rank) * (B @ A)",
        "logits_max_abs_diff": merged_diff,
        "merged_loss": float(mout.loss),
        "merged_weight_norms": merged_norms,
    }
    js["versions"] = versions
    return js, init


def print_table(name, js):
    print(f"{name}: initial_batch_loss {js['initial_batch_loss']:.6f}, final_eval_loss {js['final_eval_loss']:.6f}")
    print(f"  {'step':>4} {'lr':>11} {'loss':>10} {'micro_0':>10} {'micro_1':>10} {'grad_norm':>10}")
    for i, s in enumerate(js["steps"]):
        m0, m1 = s["micro_losses"]
        print(f"  {i + 1:>4} {s['lr']:>11.4e} {s['loss']:>10.6f} {m0:>10.6f} {m1:>10.6f} {s['grad_norm']:>10.6f}")


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(0)
    torch.manual_seed(0)

    recs = load_records()
    examples = tokenize_records(recs)
    order = build_order()
    # every epoch visits each record once
    for e in range(0, STEPS_TOTAL, 2):
        assert sorted(i for s in order[e : e + 2] for mb in s for i in mb) == list(range(12))

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }

    # forward sanity: eval-mode loss of the first 4 records equals the model fixture's batch_loss
    ref_loss, b4 = check_against_model_fixture(examples)
    m = load_model()
    m.eval()
    with torch.no_grad():
        l4 = float(forward_loss(m, b4))
    assert abs(l4 - ref_loss) <= 1e-6 * abs(ref_loss), (l4, ref_loss)
    del m

    full = train_full(examples, order, versions)
    lora, lora_init = train_lora(examples, order, versions)
    adafactor = train_adafactor(examples, order, versions)

    losses = [s["loss"] for s in full["steps"]]
    assert losses[-1] < losses[0] and sum(losses[-4:]) < sum(losses[:4]), losses
    assert full["final_eval_loss"] < full["initial_batch_loss"]
    assert full["steps"][0]["lr"] == 0.0 and lora["steps"][0]["lr"] == 0.0

    OUT.mkdir(parents=True, exist_ok=True)
    for name, js in (("full", full), ("lora", lora), ("adafactor", adafactor)):
        (OUT / f"{name}.json").write_text(json.dumps(js, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    save_file(lora_init, str(OUT / "lora_init.safetensors"), metadata={"format": "pt"})

    print_table("full", full)
    print_table("lora", lora)
    print_table("adafactor", adafactor)
    print(f"lora merged_check logits max abs diff {lora['merged_check']['logits_max_abs_diff']:.3e}")
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    sys.exit(main())
