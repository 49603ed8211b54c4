"""
Does retrieval help? Evaluate trained checkpoints on the held-out documents, split the gain by how much
text each chunk shares with its neighbours, and plot validation loss against training step.

    python train.py --n_neighbours 0 --out_dir out/baseline                 # the three models (README)
    python train.py --out_dir out/retro
    python train.py --retrofit out/baseline/ckpt.pt --out_dir out/retrofit
    python bench/retrieval_gain.py out/baseline out/retro out/retrofit      # this script

For every checkpoint: parameters, training tokens, and bits per byte of the held-out text with retrieval
(RETRO[ON]) and with the neighbours withheld (RETRO[OFF]). Then, following the paper's section 2.6 and
Norlund et al. 2023: each held-out chunk C_u is predicted while reading Ret(C_{u-1}); the longest run of
tokens that C_u shares with any of those neighbours ([N, F]) puts it in a bucket (0-8, 8-16, 16-32, 32+
tokens), and bpb is reported per bucket. Chunks that start a sequence read no neighbours and are left out
of the buckets. For each RETRO model, the mean loss on 8 training batches with the stored neighbours, with
none, and with random tokens in their place: how much the model uses its neighbours at all. The plot (needs
matplotlib, which the product does not) goes to --plot.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from build_db import load_meta, longest_shared_run, open_db  # noqa: E402
from retro import RETRO, RetroConfig  # noqa: E402

BUCKETS = [(0, 8), (8, 16), (16, 32), (32, 10 ** 9)]


@torch.no_grad()
def token_losses(model, data, neighbours: bool):
    """Per target token of every non-overlapping validation sequence: NLL (nats), bytes, target chunk."""
    nll, nbytes, chunk = [], [], []
    M, T = data.M, data.cfg.block_size
    for starts in data.eval_batches():
        x, y, nb = data.sequences("val", starts)
        logits = model(x, nb if neighbours else None)[0]
        nll.append(F.cross_entropy(logits.flatten(0, 1), y.clamp(min=0).flatten(), reduction="none").view(y.shape))
        nbytes.append(data.token_bytes[y.clamp(min=0)] * (y >= 0))
        chunk.append((torch.as_tensor(starts)[:, None] * M + torch.arange(1, T + 1)) // M)  # of each target
    return torch.cat(nll).numpy(), torch.cat(nbytes).numpy(), torch.cat(chunk).numpy()


def tokens_trained(ckpt: dict) -> int:
    tc = ckpt["train_config"]
    return ckpt["iter"] * tc["batch_size"] * tc["grad_accum"] * tc["block_size"]


@torch.no_grad()
def training_losses(model, data, n_batches: int = 8) -> dict:
    """Does the model use its neighbours on the text it was trained on? Mean loss over training batches with
    the stored neighbours, without any, and with random tokens in their place."""
    loss = {"stored": 0.0, "none": 0.0, "random": 0.0}
    g = torch.Generator().manual_seed(0)
    for i in range(n_batches):
        x, y, nb = data.batch("train", 10 ** 6 + i, 0, 0)
        rnd = torch.randint(2, model.config.vocab_size, nb.shape, generator=g)
        for key, neighbours in (("stored", nb), ("none", None), ("random", rnd)):
            loss[key] += model(x, neighbours, y)[1].item() / n_batches
    return loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="out_dir of each trained model; the first is the baseline")
    p.add_argument("--plot", default="bench/retrieval_gain.png")
    p.add_argument("--db", default="", help="evaluate with this database (same text and tokenizer) instead")
    p.add_argument("--k_eval", type=int, default=0, help="neighbours per chunk at evaluation (default: as trained)")
    args = p.parse_args()
    torch.set_num_threads(2)

    rows, per_token = [], {}
    for run in args.runs:
        ckpt = torch.load(Path(run) / "ckpt.pt", map_location="cpu", weights_only=True)
        tc = train.TrainConfig(**ckpt["train_config"])
        db = Path(args.db or tc.db or Path("data") / Path(tc.data.rstrip("/")).stem)
        meta = load_meta(db)
        train.load_checkpoint(Path(run) / "ckpt.pt", meta, db, ckpt)    # same tokenizer and chunk length
        if args.k_eval and tc.n_neighbours:
            tc.n_neighbours = args.k_eval
        data = train.Data(open_db(db), tc)
        model = RETRO(RetroConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        model.eval()
        K = tc.n_neighbours
        tokens_note, offset = f"{tokens_trained(ckpt) / 1e6:.2f}M", 0
        if tc.retrofit:                     # a RETRO-fit continues its baseline: its tokens and steps come first
            base = torch.load(tc.retrofit, map_location="cpu", weights_only=True)
            tokens_note, offset = f"{tokens_trained(base) / 1e6:.2f}M + {tokens_note}", base["iter"]
        used = sum(p.numel() for n, p in model.named_parameters()
                   if K or not (n.startswith("encoder.") or ".cca." in n or ".ln_cca." in n))
        nll_on, nbytes, chunk = token_losses(model, data, neighbours=K > 0)
        nll_off = token_losses(model, data, neighbours=False)[0] if K else nll_on
        bpb = lambda nll: nll.sum() / math.log(2) / nbytes.sum()
        rows.append(dict(run=run, params=used, tokens=tokens_note, step_offset=offset, K=K, bpb_on=bpb(nll_on),
                         bpb_off=bpb(nll_off), train=training_losses(model, data) if K else None))
        per_token[run] = (nll_on, nbytes, chunk)

    # the neighbours each held-out chunk is predicted from, and how much text it shares with them
    M = data.M
    val = data.tokens["val"]
    n_chunks = len(val) // M
    chunks = np.asarray(val[:n_chunks * M]).reshape(n_chunks, M)
    prev_nb = np.asarray(data.neighbours["val"][:n_chunks])                    # Ret(C_c) of chunk c
    shared = np.full(n_chunks, -1)
    shared[1:] = longest_shared_run(chunks[1:], prev_nb[:-1], meta["pad_id"])  # C_c against Ret(C_{c-1})

    print(f"held-out: {meta['n_val_documents']} documents of {Path(tc.data).name}, {meta['n_val_bytes']:,} bytes\n")
    print("| model | parameters | training tokens | held-out bpb, RETRO[ON] | held-out bpb, RETRO[OFF] |")
    print("|---|---|---|---|---|")
    for r in rows:
        on = f"{r['bpb_on']:.3f}" if r["K"] else "—"
        print(f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['tokens']} | {on} | {r['bpb_off']:.3f} |")

    print("\n| model | training loss (nats), stored neighbours | no neighbours | random neighbours |")
    print("|---|---|---|---|")
    for r in rows:
        if r["train"]:
            print(f"| {r['run']} | " + " | ".join(f"{r['train'][k]:.4f}" for k in ("stored", "none", "random")) + " |")

    first = np.zeros_like(chunk, dtype=bool)
    first[:, :M - 1] = True                                                     # targets in a sequence's first chunk
    header = " | ".join(f"bpb {r['run']}" for r in rows)
    print(f"\n| tokens shared with the neighbours | share of chunks | {header} |")
    print("|---|---|" + "---|" * len(rows))
    for lo, hi in BUCKETS:
        in_bucket = (shared >= lo) & (shared < hi)
        cells = []
        for r in rows:
            nll, nbytes, chunk = per_token[r["run"]]
            sel = in_bucket[np.clip(chunk, 0, n_chunks - 1)] & ~first & (chunk < n_chunks)
            cells.append(f"{nll[sel].sum() / math.log(2) / max(nbytes[sel].sum(), 1):.3f}")
        share = in_bucket.sum() / (shared >= 0).sum()
        label = f"{lo}-{hi}" if hi < 10 ** 9 else f"{lo}+"
        print(f"| {label} | {share:.0%} | " + " | ".join(cells) + " |")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(no plot: pip install matplotlib to draw one)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        log = [json.loads(line) for line in (Path(r["run"]) / "log.jsonl").read_text().splitlines()]
        offset = r["step_offset"]
        periodic, final = [e for e in log if not e["final"]], [e for e in log if e["final"]]
        line, = ax.plot([e["step"] + offset for e in periodic], [e["bpb_on"] for e in periodic], marker="o",
                        label=r["run"])
        ax.plot([e["step"] + offset for e in final], [e["bpb_on"] for e in final], marker="*", markersize=12,
                linestyle="none", color=line.get_color())
        if r["K"]:                                              # the same model with its neighbours withheld
            ax.plot([e["step"] + offset for e in periodic], [e["bpb_off"] for e in periodic], linestyle="--",
                    color=line.get_color(), alpha=0.6, label=f"{r['run']}, RETRO[OFF]")
    ax.set_xlabel("training step (a retro-fit continues its baseline's steps)")
    ax.set_ylabel("held-out bits per byte (o: 8 batches, *: all)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
