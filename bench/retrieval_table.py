"""
The tables and the figure of bench/RESULTS.md's "Does retrieval help?", from what bench/retrieval_experiment.sh wrote.

    python bench/retrieval_table.py out/exp [out/exp_seed1 ...]               # the tables, for each folder
    python bench/retrieval_table.py out/exp --png bench/retrieval_experiment.png   # and the figure (matplotlib)

Every number is read from the models' log.jsonl (the final evaluation of training) and eval.jsonl (train.py
extras/evaluate.py with each database): held-out bits per byte with retrieval (RETRO[ON]) and without (RETRO[OFF]),
and the oracle check (held-out loss in nats where neighbours are visible: none, stored, shuffled, oracle);
and, from eval.jsonl's by_overlap, held-out bpb on the chunks whose overlap with the database is at most alpha.
The figure: held-out bpb of each trained RETRO model against the database it reads, no retraining, with the two
baselines as lines (matplotlib is a benchmark-only dependency).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_db import load_meta  # noqa: E402

DATABASES = ["text", "kjv_control", "kjv_web", "kjv_web_control"]
LABELS = {"text": "KJV", "kjv_control": "KJV + Austen", "kjv_web": "KJV + WEB", "kjv_web_control": "KJV + WEB + Austen"}


def last(path: Path, **match):
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return rows[-1] if rows else None


def tables(d: Path):
    print(f"## {d}\n")
    print("| model | training database | bpb RETRO[ON] | bpb RETRO[OFF] | none | stored | shuffled | oracle |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for m, db in [("baseline", "-"), ("baseline_web", "- (WEB in its training text)"), ("retro", "data/text"),
                  ("retro_web", "data/kjv_web")]:
        r = last(d / m / "log.jsonl", final=True)
        if r is None:
            continue
        p = r.get("probe") or {}
        probe = " | ".join(f"{p[k]:.3f}" if k in p else "-" for k in ("none", "stored", "shuffled", "oracle"))
        print(f"| {m} | {db} | {r['bpb_on']:.4f} | {r['bpb_off']:.4f} | {probe} |")
    print("\nThe same trained models with other databases, no retraining (held-out bpb, RETRO[ON]; oracle check):\n")
    print("| database | indexed chunks | " + " | ".join(f"{m} bpb | {m} stored / oracle (nats)"
                                                    for m in ("retro", "retro_web")) + " |")
    print("|---|---:|" + "---:|---:|" * 2)
    for db in DATABASES:
        if not Path(f"data/{db}/meta.json").exists():
            continue
        meta = load_meta(f"data/{db}")
        n = meta.get("n_chunks", meta["n_train_chunks"])
        cells = []
        for m in ("retro", "retro_web"):
            r = last(d / m / "eval.jsonl", db=f"data/{db}")
            cells += [f"{r['bpb_on']:.4f}", f"{r['probe']['stored']:.3f} / {r['probe']['oracle']:.3f}"] if r \
                else ["-", "-"]
        print(f"| {db} | {n:,} | " + " | ".join(cells) + " |")
    evals = [(m, db, last(d / m / "eval.jsonl", db=f"data/{db}")) for m in ("retro", "retro_web")
             for db in ("text", "kjv_control", "kjv_web", "kjv_web_control")]
    evals = [(m, db, r) for m, db, r in evals if r and r.get("by_overlap")]
    if evals:
        print("\nHeld-out bpb RETRO[ON] / RETRO[OFF] on the chunks whose overlap r(C) with the database is at most "
              "alpha (share of held-out chunks in brackets; extras/evaluate.py's bpb_by_overlap):\n")
        alphas = [row["alpha"] for row in evals[0][2]["by_overlap"]]
        print("| model | database | " + " | ".join(f"r(C) <= {a:g}" for a in alphas) + " |")
        print("|---|---|" + "---:|" * len(alphas))
        for m, db, r in evals:
            print(f"| {m} | {db} | " + " | ".join(f"{row['on']:.3f} / {row['off']:.3f} ({row['share']:.0%})"
                                                  for row in r["by_overlap"]) + " |")
    print()


def plot(d: Path, out: str):
    """Held-out bpb of the two RETRO models with each database (bars), the baselines (lines)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.savefig(out)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", default=["out/exp"], help="folders bench/retrieval_experiment.sh wrote")
    p.add_argument("--png", default="", help="draw the figure of the first folder to this file")
    args = p.parse_args(argv)
    for d in args.dirs:
        tables(Path(d))
    if args.png:
        plot(Path(args.dirs[0]), args.png)


if __name__ == "__main__":
    main()
