"""Reference values for the outer optimizers (node/src/averaging/aggregate.rs tests).

meshtune applies torch.optim.Adam / AdamW to the pseudo-gradient g = -aggregate. This script
runs the same three steps in torch and prints the Rust constants the test compares against.
Run: python scripts/outer_optimizer_reference.py (needs torch; see requirements-fixtures.txt).
"""

import torch

DELTAS = [[1.0, -2.0, 0.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 0.0]]


def run(make):
    p = torch.nn.Parameter(torch.tensor([0.5, -2.0, 0.0], dtype=torch.float32))
    opt = make([p])
    out = []
    for delta in DELTAS:
        p.grad = -torch.tensor(delta, dtype=torch.float32)
        opt.step()
        out.append([float(v) for v in p.detach()])
    return out


def rust(name, rows):
    body = ", ".join("[" + ", ".join(f"{v:.9}" for v in row) + "]" for row in rows)
    print(f"const {name}: [[f64; 3]; 3] = [{body}];")


print(f"// torch {torch.__version__}")
rust("ADAM_REFERENCE", run(lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.9, 0.99), eps=1e-8)))
rust(
    "ADAMW_REFERENCE",
    run(lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)),
)
