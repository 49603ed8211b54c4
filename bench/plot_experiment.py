"""
The picture of the README's "Does retrieval help?": held-out bits per byte of each trained model against the
size of the database it reads, no retraining (the paper's Figure 1, middle, at our scale), with the two
baselines as lines. Every point is one full evaluation of the 6 held-out books, read from what
bench/retrieval_experiment.sh wrote (eval.jsonl, log.jsonl).

    python bench/plot_experiment.py out/exp --out bench/retrieval_experiment.png   # needs matplotlib (bench only)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_db import load_meta  # noqa: E402
from retrieval_table import DATABASES, last  # noqa: E402

LABELS = {"text": "KJV", "kjv_control": "KJV + Austen", "kjv_web": "KJV + WEB", "kjv_web_control": "KJV + WEB + Austen"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default="out/exp")
    p.add_argument("--out", default="bench/retrieval_experiment.png")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = Path(args.dir)
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    order = [db for db in DATABASES if Path(f"data/{db}/meta.json").exists()]
    for i, (m, label, colour) in enumerate((("retro", "RETRO trained with the KJV as its database", "tab:blue"),
                                            ("retro_web", "RETRO trained with KJV + WEB as its database", "tab:red"))):
        for x, db in enumerate(order):
            r = last(d / m / "eval.jsonl", db=f"data/{db}")
            if r is not None:
                ax.bar(x + (i - 0.5) * 0.38, r["bpb_on"], width=0.36, color=colour, label=label if x == 0 else None)
                ax.annotate(f"{r['bpb_on']:.3f}", (x + (i - 0.5) * 0.38, r["bpb_on"]), ha="center",
                            textcoords="offset points", xytext=(0, 2), fontsize=7)
    ticks = []
    for db in order:
        meta = load_meta(f"data/{db}")
        ticks.append(f"{LABELS[db]}\n{meta.get('n_chunks', meta['n_train_chunks']):,} chunks")
    ax.set_xticks(range(len(order)), ticks, fontsize=8)
    ax.set_ylim(0.8, 1.9)
    for m, label, style in (("baseline", "baseline, no retrieval (KJV)", "--"),
                            ("baseline_web", "baseline trained on KJV + WEB", ":")):
        r = last(d / m / "log.jsonl", final=True)
        if r is not None:
            ax.axhline(r["bpb_on"], color="gray", linestyle=style, label=f"{label}: {r['bpb_on']:.3f}")
    ax.set_xlabel("the database at evaluation (the same trained models, no retraining)")
    ax.set_ylabel("held-out bits per byte (6 KJV books)")
    ax.set_title("Held-out bpb against the database a trained model reads", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
