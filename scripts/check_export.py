#!/usr/bin/env python3
"""Checks that a T5 folder exported by meshtune loads in Hugging Face transformers and
computes the same thing as a reference folder.

    python scripts/check_export.py EXPORTED_DIR REFERENCE_DIR [--tol 1e-4]

REFERENCE_DIR is one of fixtures/models/<name>/ (it must hold expected.safetensors,
as written by scripts/make_fixtures.py). Both folders are loaded with
T5ForConditionalGeneration.from_pretrained(..., dtype=torch.float32); the batch
stored in REFERENCE_DIR/expected.safetensors (input_ids, attention_mask, labels) is
run through both models. EXPORTED_DIR/tokenizer.json is loaded with `tokenizers`
and PreTrainedTokenizerFast; its special-token ids must be T5's (<pad>=0, </s>=1,
<unk>=2) and, when REFERENCE_DIR has a tokenizer.json, it must encode the same
texts to the same ids.

Prints one JSON object on stdout. Exit status: 0 when everything loads, the
tokenizer matches and the max abs difference of the logits is <= --tol; 1 when a
check fails; 2 when a folder cannot be loaded.
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

EXTRA_TEXTS = [
    "summarize: Amanda: I baked cookies. Do you want some?\nJerry: Sure!",
    "Nina and Paul are meeting at the café at six…  and   then?",
    "<extra_id_0> unknown ☃ characters </s>",
]


def load_model(path):
    m = T5ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def load_tokenizers(path):
    tj = pathlib.Path(path) / "tokenizer.json"
    raw = Tokenizer.from_file(str(tj))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tj), pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return raw, fast


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exported_dir")
    ap.add_argument("reference_dir")
    ap.add_argument("--tol", type=float, default=1e-4, help="max allowed abs difference of the logits")
    args = ap.parse_args()
    torch.set_num_threads(1)

    exp_dir, ref_dir = pathlib.Path(args.exported_dir), pathlib.Path(args.reference_dir)
    report = {"exported_dir": str(exp_dir), "reference_dir": str(ref_dir), "tol": args.tol}
    failures = []

    try:
        batch = load_file(str(ref_dir / "expected.safetensors"))
        ref_model = load_model(ref_dir)
        exp_model = load_model(exp_dir)
        raw_tok, fast_tok = load_tokenizers(exp_dir)
    except Exception as e:  # noqa: BLE001
        report["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(report, indent=2))
        sys.exit(2)

    # ---- tokenizer
    specials = {t: raw_tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")}
    report["tokenizer_special_ids"] = specials
    report["tokenizer_vocab_size"] = raw_tok.get_vocab_size()
    if specials != {"<pad>": 0, "</s>": 1, "<unk>": 2}:
        failures.append("tokenizer special ids are not <pad>=0 </s>=1 <unk>=2")
    if fast_tok("x")["input_ids"][-1] != 1:
        failures.append("tokenizer does not append </s>")
    mismatched = []
    if (ref_dir / "tokenizer.json").exists():
        ref_raw, _ = load_tokenizers(ref_dir)
        texts = list(EXTRA_TEXTS)
        for key in ("input_ids", "labels"):
            for row in batch[key].tolist():
                texts.append(ref_raw.decode([t for t in row if t >= 0], skip_special_tokens=True))
        for t in texts:
            a, b = raw_tok.encode(t).ids, ref_raw.encode(t).ids
            if a != b or fast_tok(t)["input_ids"] != b:
                mismatched.append(t)
        report["tokenizer_texts_checked"] = len(texts)
        report["tokenizer_texts_mismatched"] = mismatched
        if mismatched:
            failures.append(f"tokenizer encodes {len(mismatched)} text(s) differently from the reference")

    # ---- model
    if exp_model.config.vocab_size != ref_model.config.vocab_size:
        failures.append(f"vocab_size {exp_model.config.vocab_size} != reference {ref_model.config.vocab_size}")
    report["exported_config"] = {
        k: getattr(exp_model.config, k)
        for k in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers", "num_decoder_layers",
                  "feed_forward_proj", "relative_attention_num_buckets", "relative_attention_max_distance",
                  "scale_decoder_outputs")
    }
    report["exported_lm_head_tied"] = exp_model.lm_head.weight.data_ptr() == exp_model.shared.weight.data_ptr()
    report["reference_lm_head_tied"] = ref_model.lm_head.weight.data_ptr() == ref_model.shared.weight.data_ptr()

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        r = ref_model(**inputs)
        try:
            e = exp_model(**inputs)
        except Exception as ex:  # noqa: BLE001
            report["error"] = f"exported model forward failed: {type(ex).__name__}: {ex}"
            print(json.dumps(report, indent=2))
            sys.exit(1)
    if e.logits.shape != r.logits.shape:
        failures.append(f"logits shape {list(e.logits.shape)} != reference {list(r.logits.shape)}")
    else:
        report["max_abs_diff_logits"] = (e.logits - r.logits).abs().max().item()
        report["max_abs_diff_encoder_last_hidden_state"] = (
            (e.encoder_last_hidden_state - r.encoder_last_hidden_state).abs().max().item()
        )
        report["loss_exported"] = e.loss.item()
        report["loss_reference"] = r.loss.item()
        if "logits" in batch:
            report["max_abs_diff_logits_vs_stored"] = (e.logits - batch["logits"]).abs().max().item()
        if not report["max_abs_diff_logits"] <= args.tol:  # also catches NaN
            failures.append(f"max abs diff of logits {report['max_abs_diff_logits']} > {args.tol}")

    report["ok"] = not failures
    report["failures"] = failures
    print(json.dumps(report, indent=2, ensure_ascii=False))
    sys.exit(0 if not failures else 1)


if __name__ == "__main__":
    main()
