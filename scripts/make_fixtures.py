#!/usr/bin/env python3
"""Writes the FLAN-T5 / T5 parity fixtures under fixtures/ (except fixtures/rouge/
and fixtures/synthetic/, which other scripts own).

Nothing is downloaded: the data set is hard-coded below, the tokenizer is a
T5-style Unigram model trained locally with the `tokenizers` library, and the
three tiny models are randomly initialised (seeded) and then trained for a few
hundred Adam steps so that their generations are not degenerate. The reference
numbers (logits, losses, greedy and beam-search outputs) come from Hugging Face
`transformers` in fp32 on the CPU.

Outputs:

    fixtures/samsum_tiny.jsonl        12 made-up Samsum-style records (id, dialogue, summary)
    fixtures/samsum_tiny.json         the same records as one JSON array (HF datasets export format)
    fixtures/tokenizer/tokenizer.json T5-style Unigram tokenizer (<pad>=0, </s>=1, <unk>=2)
    fixtures/models/<name>/           config.json, weights, tokenizer.json,
                                      expected.safetensors, expected.json
        flan-odd          gated-gelu, untied lm_head, num_heads*d_kv != d_model, 2 enc / 3 dec
                          layers, 16 buckets / max distance 40, model vocab = tokenizer vocab + 37,
                          f32, single file, with encoder/decoder.embed_tokens.weight duplicates
        t5-relu-tied      relu, tied lm_head (decoder output scaled by d_model**-0.5), bf16,
                          no lm_head.weight key
        flan-sharded-f16  gated-gelu, untied, f16, sharded into 3 files + model.safetensors.index.json

Usage (from the repository root; takes well under a minute on one core):

    pip install -r scripts/requirements-fixtures.txt
    python scripts/make_fixtures.py                      # reuses fixtures/tokenizer/tokenizer.json
    python scripts/make_fixtures.py --retrain-tokenizer  # retrains the tokenizer first

The script is deterministic (fixed seeds, one thread, no clock): running it twice
with the same package versions (scripts/requirements-fixtures.txt) on the same
machine gives byte-identical files. The committed tokenizer.json is reused unless
--retrain-tokenizer is given, so the models do not depend on the tokenizer
trainer being reproducible.
"""

import argparse
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers.cache_utils import DynamicCache, EncoderDecoderCache  # noqa: E402
from transformers import GenerationConfig, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
TOK_PATH = FIX / "tokenizer" / "tokenizer.json"

PREFIX = "summarize: "
SOURCE_MAX_LEN = 64
TARGET_MAX_LEN = 24
FULL_MAX_LEN = 512
BATCH_EXAMPLES = 4
TOKENIZER_VOCAB_TARGET = 512
NUM_EXTRA_IDS = 3  # real T5 has 100 <extra_id_N> sentinels; a few keep the tokenizer vocab off a multiple of 8

GEN_SETTINGS = {
    "greedy": {"num_beams": 1, "max_new_tokens": 20, "do_sample": False},
    "beam": {"num_beams": 4, "max_new_tokens": 20, "do_sample": False, "length_penalty": 1.0, "early_stopping": False},
    "beam_es": {"num_beams": 3, "max_new_tokens": 16, "do_sample": False, "length_penalty": 0.6, "early_stopping": True},
}

# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

RECORDS = [
    {
        "id": "13680001",
        "dialogue": "Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nAmanda: I'll bring you tomorrow :-)",
        "summary": "Amanda baked cookies and will bring Jerry some tomorrow.",
    },
    {
        "id": "13680002",
        "dialogue": "Tom: Running late, sorry!\nAnna: ok",
        "summary": "Tom is late.",
    },
    {
        "id": "13680003",
        "dialogue": (
            "Olivia: Hi everyone, quick question about the weekend trip to the lake.\n"
            "Mark: Go ahead, I'm listening.\n"
            "Olivia: My car only has five seats, so somebody else has to drive too.\n"
            "Kate: I can take my dad's van, it fits seven people and all the bags.\n"
            "Mark: Great, then we leave on Friday at four from the station.\n"
            "Olivia: Perfect. Who is buying food for the barbecue?\n"
            "Kate: Mark and I will go to the market on Thursday evening after work.\n"
            "Olivia: Thanks, I will book the cabin tonight and send you the address."
        ),
        "summary": "Kate will drive her dad's van to the lake on Friday and Olivia will book the cabin.",
    },
    {
        "id": "13680004",
        "dialogue": (
            "Greg: Did you see the email from the landlord?\n"
            "Lucy: Yes, he wants to raise the rent from March.\n"
            "Greg: By how much?\n"
            "Lucy: Fifty pounds a month, and he also wants us to pay for the new boiler, the window repair "
            "in the kitchen and the cleaning of the stairs.\n"
            "Greg: That is too much, let's call him."
        ),
        "summary": (
            "The landlord wants to raise the rent by fifty pounds a month from March and wants Greg and Lucy "
            "to pay for the boiler, the kitchen window and the stairs, so they will call him."
        ),
    },
    {
        "id": "13680005",
        "dialogue": "Sam: Where are my keys?\nEmma: On the table next to the door.\nSam: Found them, thanks!",
        "summary": "Sam's keys are on the table next to the door.",
    },
    {
        "id": "13680006",
        "dialogue": (
            "Nina: Are we still meeting at the café at six?\n"
            "Paul: Yes, but I might be ten minutes late…\n"
            "Nina: No worries, I'll order tea for both of us."
        ),
        "summary": "Nina and Paul are meeting at the café at six and Nina will order tea.",
    },
    {
        "id": "13680007",
        "dialogue": (
            "Jack: The match starts at eight.\n"
            "Ben: Should I bring pizza?\n"
            "Jack: Yes, and some drinks.\n"
            "Ben: Ok, see you at eight."
        ),
        "summary": "Ben will bring pizza and drinks to watch the match at eight.",
    },
    {
        "id": "13680008",
        "dialogue": (
            "Mia: Mum, can you pick me up from school today?\n"
            "Mum: I finish work at five, is that ok?\n"
            "Mia: Yes, I have a music lesson until five anyway."
        ),
        "summary": "Mum will pick Mia up from school after five.",
    },
    {
        "id": "13680009",
        "dialogue": (
            "Leo: My laptop died again.\n"
            "Zoe: Did you try charging it?\n"
            "Leo: Of course, the battery is broken.\n"
            "Zoe: Take it to the shop on Main Street, they fixed mine in one day."
        ),
        "summary": "Leo's laptop battery is broken and Zoe suggests the shop on Main Street.",
    },
    {
        "id": "13680010",
        "dialogue": "Hannah: Happy birthday, Eric!!\nEric: Thank you so much :)",
        "summary": "Hannah wishes Eric a happy birthday.",
    },
    {
        "id": "13680011",
        "dialogue": (
            "Chris: Can I borrow your bike this weekend?\n"
            "Rachel: Sure, but the front tyre is a bit flat.\n"
            "Chris: No problem, I will pump it.\n"
            "Rachel: The key for the lock is under the mat."
        ),
        "summary": "Rachel will lend Chris her bike this weekend and the key is under the mat.",
    },
    {
        "id": "13680012",
        "dialogue": (
            "Ella: Did you feed the cat?\n"
            "Adam: Not yet, we are out of cat food.\n"
            "Ella: I will buy some on the way home.\n"
            "Adam: Thanks, get the fish one, she likes it."
        ),
        "summary": "Ella will buy fish cat food on the way home because they ran out.",
    },
]


def tokenizer_corpus():
    """Dialogues, summaries and seeded template sentences, plus one line listing every word twice."""
    rng = random.Random(1234)
    names = [
        "Amanda", "Jerry", "Tom", "Anna", "Olivia", "Mark", "Kate", "Greg", "Lucy", "Sam", "Emma", "Nina",
        "Paul", "Jack", "Ben", "Mia", "Leo", "Zoe", "Hannah", "Eric", "Chris", "Rachel", "Ella", "Adam",
        "Mum", "Dad", "Peter", "Laura", "Oscar", "Julia",
    ]
    verbs = [
        "will bring", "wants to buy", "is going to visit", "forgot", "found", "will call", "needs",
        "likes", "is cooking", "will meet", "lost", "is looking for", "has to fix", "asked about",
        "will send", "is waiting for", "booked", "cancelled", "ordered", "cleaned",
    ]
    objects = [
        "the cookies", "a new phone", "the tickets", "the car", "some pizza", "the keys", "a cake",
        "the bike", "the report", "a present", "the dog", "the flat", "the train", "a table", "the book",
        "the laptop", "the money", "the photos", "a taxi", "the shopping",
    ]
    times = [
        "tomorrow", "tonight", "on Monday", "on Friday", "next week", "at noon", "after work",
        "this weekend", "in the morning", "before dinner", "at seven", "later today",
    ]
    places = [
        "at home", "at the office", "in town", "at the station", "at school", "at the party",
        "near the park", "at the shop", "at the cinema", "at the gym", "by the lake",
    ]
    replies = [
        "Sure!", "Ok, thanks.", "No problem.", "Great, see you then.", "Really?", "I don't know.",
        "Sounds good :)", "Sorry, I can't.", "Why not?", "Let me check.", "Yes, please.", "Haha, ok",
    ]
    lines = []
    for r in RECORDS:
        lines.extend(r["dialogue"].split("\n"))
        lines.append(r["summary"])
        lines.append(PREFIX + r["dialogue"].replace("\n", " "))
    for _ in range(600):
        a, b = rng.sample(names, 2)
        kind = rng.randrange(3)
        if kind == 0:
            lines.append(f"{a} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(times)}.")
        elif kind == 1:
            lines.append(
                f"{a}: Did you {rng.choice(['see', 'get', 'take', 'like'])} {rng.choice(objects)} "
                f"{rng.choice(places)}? {b}: {rng.choice(replies)}"
            )
        else:
            lines.append(
                f"{a} and {b} {rng.choice(verbs).replace('is ', 'are ').replace('has ', 'have ')} "
                f"{rng.choice(objects)} {rng.choice(places)} {rng.choice(times)}."
            )
    words = sorted({w for line in lines for w in line.split()})
    lines.append(" ".join(f"{w} {w}" for w in words))
    return lines


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def train_tokenizer():
    pre = Tokenizer(models.Unigram())
    # T5's real tokenizer.json: Sequence[Precompiled(nmt_nfkc charsmap), Replace(" {2,}", " ")].
    # NFKC stands in for the charsmap here.
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    pre.normalizer = normalizer
    pre.pre_tokenizer = pre_tokenizer
    trainer = trainers.UnigramTrainer(
        vocab_size=TOKENIZER_VOCAB_TARGET,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        shrinking_factor=0.75,
        max_piece_length=16,
        n_sub_iterations=2,
        show_progress=False,
    )
    pre.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    # The trainer is not bit-reproducible: scores differ in the last bits between runs, and the ids of
    # rare single characters (which get near-equal scores) depend on hash-map order. Rounding removes the
    # first; the second is why the committed tokenizer.json is reused unless --retrain-tokenizer is given.
    vocab = [(p, round(s, 8)) for p, s in json.loads(pre.to_str())["model"]["vocab"]]
    # Like transformers' T5Converter: sentinel tokens go at the END of the Unigram vocab, in reverse order
    # (<extra_id_{N-1}> first, <extra_id_0> last), score 0.0, and are also registered as special added tokens.
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(NUM_EXTRA_IDS - 1, -1, -1)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(NUM_EXTRA_IDS - 1, -1, -1)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1 and tok.token_to_id("<unk>") == 2
    assert tok.token_to_id("<extra_id_0>") == len(vocab) - 1 == tok.get_vocab_size() - 1
    return tok


def load_or_train_tokenizer(retrain):
    if retrain or not TOK_PATH.exists():
        tok = train_tokenizer()
        TOK_PATH.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(TOK_PATH), pretty=True)
        print(f"trained tokenizer: vocab {tok.get_vocab_size()}", file=sys.stderr)
    tok = Tokenizer.from_file(str(TOK_PATH))
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1 and tok.token_to_id("<unk>") == 2
    return tok


def hf_tokenizer():
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOK_PATH), pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

MODEL_SPECS = {
    "flan-odd": dict(
        config=dict(
            feed_forward_proj="gated-gelu", d_model=32, d_kv=12, num_heads=3, d_ff=48, num_layers=2,
            num_decoder_layers=3, relative_attention_num_buckets=16, relative_attention_max_distance=40,
        ),
        tied=False, vocab=lambda v: v + 37, dtype=torch.float32, shards=1, embed_copies=True,
        # how config.json spells the head: real FLAN-T5 files have tie_word_embeddings=false and no
        # scale_decoder_outputs key
        config_keys={"tie_word_embeddings": False, "scale_decoder_outputs": None},
        seed=11, steps=40, lr=3e-3,
    ),
    "t5-relu-tied": dict(
        config=dict(
            feed_forward_proj="relu", d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
            num_decoder_layers=2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        ),
        tied=True, vocab=lambda v: (v + 7) // 8 * 8, dtype=torch.bfloat16, shards=1, embed_copies=False,
        config_keys={"tie_word_embeddings": True, "scale_decoder_outputs": True},
        seed=22, steps=90, lr=3e-3,
    ),
    "flan-sharded-f16": dict(
        config=dict(
            feed_forward_proj="gated-gelu", d_model=48, d_kv=16, num_heads=3, d_ff=96, num_layers=2,
            num_decoder_layers=2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        ),
        tied=False, vocab=lambda v: v, dtype=torch.float16, shards=3, embed_copies=False,
        # what transformers 5.x itself would write for an untied T5 (tie flag forced true, scale key false),
        # except that the tie flag is written false
        config_keys={"tie_word_embeddings": False, "scale_decoder_outputs": False},
        seed=33, steps=45, lr=1e-3,
    ),
}

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def make_config(spec, vocab_size):
    cfg = T5Config(
        vocab_size=vocab_size,
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=spec["tied"],
        architectures=["T5ForConditionalGeneration"],
        **spec["config"],
    )
    assert cfg.scale_decoder_outputs == spec["tied"]
    return cfg


def build_model(spec, vocab_size):
    cfg = make_config(spec, vocab_size)
    torch.manual_seed(spec["seed"])
    model = T5ForConditionalGeneration(cfg)
    model.config._attn_implementation = "eager"
    if not spec["tied"]:
        # transformers 5.x always ties lm_head to shared at construction; untie it.
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    g = torch.Generator().manual_seed(spec["seed"] * 1000 + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name == "shared.weight":
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    if spec["tied"]:
        assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    else:
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    return model


def encode_batch(hf_tok, sources, targets, src_max, tgt_max):
    enc = hf_tok(sources, max_length=src_max, truncation=True, padding=True, return_tensors="pt")
    lab = hf_tok(targets, max_length=tgt_max, truncation=True, padding=True, return_tensors="pt")
    labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


def train(model, spec, hf_tok):
    sources = [PREFIX + r["dialogue"] for r in RECORDS]
    targets = [r["summary"] for r in RECORDS]
    # Sources are cut at 64 tokens to keep training fast. Training stops early on purpose: a half-trained
    # model gives greedy and beam outputs that differ, and finishes some generations but not all.
    input_ids, attention_mask, labels = encode_batch(hf_tok, sources, targets, SOURCE_MAX_LEN, 512)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    for _ in range(spec["steps"]):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def hf_state_dict(model, spec):
    """The tensors as they go into the checkpoint, in HF key names and the storage dtype."""
    sd = {}
    for k, v in model.state_dict().items():
        if k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") and not spec["embed_copies"]:
            continue
        if k == "lm_head.weight" and spec["tied"]:
            continue
        sd[k] = v.detach().to(spec["dtype"]).contiguous().clone()
    return dict(sorted(sd.items()))


def load_rounded_weights(model, sd, spec):
    """Loads the stored (rounded) weights back into the fp32 model."""
    full = {k: v.to(torch.float32) for k, v in sd.items()}
    full.setdefault("encoder.embed_tokens.weight", full["shared.weight"])
    full.setdefault("decoder.embed_tokens.weight", full["shared.weight"])
    if spec["tied"]:
        full["lm_head.weight"] = full["shared.weight"]
    missing, unexpected = model.load_state_dict(full, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    if spec["tied"]:
        assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()


def write_weights(out, sd, spec):
    meta = {"format": "pt"}
    if spec["shards"] == 1:
        save_file(sd, str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    keys = list(sd.keys())
    n = spec["shards"]
    # split into n contiguous groups of roughly equal byte size
    sizes = [sd[k].numel() * sd[k].element_size() for k in keys]
    total = sum(sizes)
    groups, cur, acc = [], [], 0
    for k, s in zip(keys, sizes):
        cur.append(k)
        acc += s
        if acc >= total * (len(groups) + 1) / n and len(groups) < n - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    assert len(groups) == n and all(groups)
    weight_map, files = {}, []
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k] for k in g}, str(out / fname), metadata=meta)
        files.append(fname)
        for k in g:
            weight_map[k] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files + ["model.safetensors.index.json"]


def write_config(out, model, spec):
    with tempfile.TemporaryDirectory() as td:
        model.config.save_pretrained(td)
        cfg = json.loads((pathlib.Path(td) / "config.json").read_text())
    for k, v in spec["config_keys"].items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg["dtype"] = DTYPE_NAMES[spec["dtype"]]
    cfg.pop("_attn_implementation", None)
    cfg.pop("attn_implementation", None)
    (out / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def generation_config(settings):
    return GenerationConfig(
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        num_return_sequences=1,
        min_length=0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        use_cache=True,
        temperature=None,
        top_k=None,
        top_p=None,
        **settings,
    )


@torch.no_grad()
def run_generation(model, hf_tok, tok_vocab):
    sources = [PREFIX + r["dialogue"] for r in RECORDS]
    # like the score section: max_length 512, which truncates nothing here
    enc = hf_tok(sources, max_length=FULL_MAX_LEN, truncation=True, padding=True, return_tensors="pt")
    out = {}
    for name, settings in GEN_SETTINGS.items():
        gc = generation_config(settings)
        # transformers sizes the cache it makes for generate() from config.num_layers (the ENCODER depth), so a
        # model with num_decoder_layers > num_layers dies with IndexError in DynamicCache.update; hand generate()
        # a cache sized from the decoder's own config instead.
        cache = EncoderDecoderCache(DynamicCache(config=model.decoder.config), DynamicCache(config=model.decoder.config))
        res = model.generate(
            input_ids=enc["input_ids"],
            cache=cache,
            attention_mask=enc["attention_mask"],
            generation_config=gc,
            return_dict_in_generate=True,
            output_scores=settings["num_beams"] > 1,
        )
        seqs = res.sequences
        results = []
        for i, r in enumerate(RECORDS):
            row = seqs[i].tolist()
            assert row[0] == 0, "first position must be the decoder start token"
            gen = row[1:]
            finished = 1 in gen
            if finished:
                gen = gen[: gen.index(1)]
            # HF pads finished rows with pad(0); a real 0 before EOS would be ambiguous, so forbid it.
            assert 0 not in gen, (name, r["id"], row)
            assert all(t < tok_vocab for t in gen), "generated an id outside the tokenizer vocab"
            item = {
                "id": r["id"],
                "token_ids": gen,
                "text": hf_tok.backend_tokenizer.decode(gen, skip_special_tokens=True),
                "finished": finished,
            }
            if settings["num_beams"] > 1:
                item["sequence_score"] = float(res.sequences_scores[i])
            results.append(item)
        out[name] = {"settings": dict(settings, num_return_sequences=1, min_length=0), "results": results}
    return out


@torch.no_grad()
def expectations(model, hf_tok, tok_vocab):
    recs = RECORDS[:BATCH_EXAMPLES]
    input_ids, attention_mask, labels = encode_batch(
        hf_tok, [PREFIX + r["dialogue"] for r in recs], [r["summary"] for r in recs], SOURCE_MAX_LEN, TARGET_MAX_LEN
    )
    outp = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    decoder_input_ids = model._shift_right(labels)
    tensors = {
        "input_ids": input_ids.to(torch.int64).contiguous(),
        "attention_mask": attention_mask.to(torch.int64).contiguous(),
        "labels": labels.to(torch.int64).contiguous(),
        "decoder_input_ids": decoder_input_ids.to(torch.int64).contiguous(),
        "encoder_last_hidden_state": outp.encoder_last_hidden_state.float().contiguous(),
        "logits": outp.logits.float().contiguous(),
    }
    score = []
    for r in RECORDS:
        ids = hf_tok(PREFIX + r["dialogue"], max_length=FULL_MAX_LEN, truncation=True, return_tensors="pt")["input_ids"]
        lab = hf_tok(r["summary"], max_length=FULL_MAX_LEN, truncation=True, return_tensors="pt")["input_ids"]
        loss = model(input_ids=ids, labels=lab).loss
        score.append({"id": r["id"], "loss": float(loss), "tokens": int(lab.shape[1])})
    js = {
        "prefix": PREFIX,
        "source_max_len": SOURCE_MAX_LEN,
        "target_max_len": TARGET_MAX_LEN,
        "batch_examples": [r["id"] for r in recs],
        "batch_loss": float(outp.loss),
        # score and generate tokenize with this limit (no record reaches it)
        "full_max_len": FULL_MAX_LEN,
        "score": score,
        "generate": run_generation(model, hf_tok, tok_vocab),
    }
    return tensors, js


def check_generation_variety(name, gen):
    g, b, e = (gen[k]["results"] for k in ("greedy", "beam", "beam_es"))
    differ = sum(x["token_ids"] != y["token_ids"] for x, y in zip(g, b))
    differ_es = sum(x["token_ids"] != y["token_ids"] for x, y in zip(b, e))
    fin = {k: sum(x["finished"] for x in gen[k]["results"]) for k in gen}
    print(f"  {name}: greedy!=beam {differ}/12, beam!=beam_es {differ_es}/12, finished {fin}", file=sys.stderr)
    assert differ >= 1, f"{name}: greedy and beam agree on every example"
    for k, v in fin.items():
        assert 0 < v < len(RECORDS), f"{name}/{k}: finished on {v} of {len(RECORDS)} examples"


def verify_reload(out, tensors, spec):
    m = T5ForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager")
    m.eval()
    if spec["tied"]:
        assert m.lm_head.weight.data_ptr() == m.shared.weight.data_ptr()
    else:
        assert not torch.equal(m.lm_head.weight, m.shared.weight)
    assert m.config.scale_decoder_outputs == spec["tied"]
    with torch.no_grad():
        o = m(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], labels=tensors["labels"])
    diff = (o.logits - tensors["logits"]).abs().max().item()
    diff_enc = (o.encoder_last_hidden_state - tensors["encoder_last_hidden_state"]).abs().max().item()
    assert diff <= 1e-5 and diff_enc <= 1e-5, (out.name, diff, diff_enc)
    return diff


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--retrain-tokenizer", action="store_true", help="retrain fixtures/tokenizer/tokenizer.json")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

    FIX.mkdir(exist_ok=True)
    with open(FIX / "samsum_tiny.jsonl", "w", encoding="utf-8") as f:
        for r in RECORDS:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (FIX / "samsum_tiny.json").write_text(json.dumps(RECORDS, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    tok = load_or_train_tokenizer(args.retrain_tokenizer)
    tok_vocab = tok.get_vocab_size()
    hf_tok = hf_tokenizer()
    # the HF wrapper and the raw tokenizer must agree (the Rust side uses the raw one)
    for r in RECORDS:
        s = PREFIX + r["dialogue"]
        assert hf_tok(s)["input_ids"] == tok.encode(s).ids
        assert tok.encode(s).ids[-1] == 1
    print(f"tokenizer vocab {tok_vocab}", file=sys.stderr)

    versions = {"transformers": transformers.__version__, "torch": torch.__version__, "tokenizers": tokenizers.__version__}
    t0 = time.time()
    for name, spec in MODEL_SPECS.items():
        out = FIX / "models" / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        vocab_size = spec["vocab"](tok_vocab)
        model = build_model(spec, vocab_size)
        final_loss = train(model, spec, hf_tok)
        print(f"  trained {name} in {time.time() - t0:.1f}s", file=sys.stderr)
        sd = hf_state_dict(model, spec)
        load_rounded_weights(model, sd, spec)
        model.eval()
        write_weights(out, sd, spec)
        write_config(out, model, spec)
        shutil.copyfile(TOK_PATH, out / "tokenizer.json")
        tensors, js = expectations(model, hf_tok, tok_vocab)
        js["versions"] = versions
        js["model"] = {
            "name": name,
            "vocab_size": vocab_size,
            "tokenizer_vocab_size": tok_vocab,
            "storage_dtype": DTYPE_NAMES[spec["dtype"]],
            "tied_lm_head": spec["tied"],
            "training_steps": spec["steps"],
        }
        save_file(tensors, str(out / "expected.safetensors"))
        (out / "expected.json").write_text(json.dumps(js, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"{name}: vocab {vocab_size}, train loss {final_loss:.3f}, batch loss {js['batch_loss']:.3f}", file=sys.stderr)
        check_generation_variety(name, js["generate"])
        verify_reload(out, tensors, spec)


if __name__ == "__main__":
    main()
