"""
The paper's Figure 6 at this scale: held-out bits per byte on the chunks whose overlap with the database is at
most alpha, for alpha from 0 to 1, with retrieval (RETRO[ON]), the same weights without it (RETRO[OFF]) and a
baseline trained without retrieval. The overlap r(C) of a held-out chunk is the paper's (section 2.6): the
longest run of its tokens that one of its 10 nearest database chunks [N, F] holds, over its length
(extras/evaluate.py's chunk_overlap). Each model is evaluated as extras/evaluate.py does (every held-out token once).

    python train.py && python train.py --n_neighbours 0 --out_dir out/baseline          # the quick start's pair
    python bench/overlap_curve.py --model "KJV+WEB" out out/baseline data/text+web --png bench/overlap_curve.png

--model LABEL OUT_DIR BASELINE_DIR DB may be repeated (DB: the database to evaluate with, "-" for the model's
own). The table goes to stdout and, with --json, to a file; the picture needs matplotlib (benchmark-only).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import build_db  # noqa: E402
import train  # noqa: E402
from extras import evaluate as evaluate_tool  # noqa: E402

ALPHAS = np.round(np.linspace(0, 1, 33), 4)     # the curve; extras/evaluate.py's ALPHAS are the table's


def evaluate(out_dir: str, db: str, device: str, dtype: str) -> tuple:
    """(evaluate's result, the database) for out_dir's checkpoint with db ("-": the one it was trained with)."""
    model, _, cfg, database, device = evaluate_tool.trained_model(
        train.TrainConfig(out_dir=out_dir, db="" if db == "-" else db, device=device))
    ctx = build_db.autocast(device, build_db.resolve_dtype(dtype, device)[0])
    return train.evaluate(model, train.Data(database, cfg), ctx, device, desc=out_dir), database


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs=4, action="append", required=True, metavar=("LABEL", "OUT_DIR", "BASELINE", "DB"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="as train.py's --dtype (float32: the recorded figures)")
    p.add_argument("--json", default="")
    p.add_argument("--png", default="")
    args = p.parse_args(argv)
    results = []
    for label, out_dir, baseline, db in args.model:
        r, database = evaluate(out_dir, db, args.device, args.dtype)
        base, _ = evaluate(baseline, str(database.path), args.device, args.dtype)
        chunks = {**r["chunks"], "baseline": base["chunks"]["on"]}
        overlap = evaluate_tool.chunk_overlap(database)
        rows = evaluate_tool.bpb_by_overlap(chunks, overlap, ("on", "off", "baseline"), ALPHAS)
        results.append(dict(label=label, out_dir=out_dir, baseline=baseline, db=str(database.path), rows=rows))
        print(f"{label}: {out_dir} against {baseline}, database {database.path}")
        print("  r(C) <=   chunks          ON       OFF  baseline   ON vs OFF   ON vs baseline")
        for row in (r for r in evaluate_tool.bpb_by_overlap(chunks, overlap, ("on", "off", "baseline")) if r["chunks"]):
            print(f"  {row['alpha']:<8g}{row['chunks']:6,} ({row['share']:4.0%})  {row['on']:.4f}  {row['off']:.4f}"
                  f"    {row['baseline']:.4f}      {row['on'] / row['off'] - 1:+.1%}          "
                  f"{row['on'] / row['baseline'] - 1:+.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False, sharey=True)
        for ax, res in zip(axes[0], results):
            rows = [row for row in res["rows"] if row["chunks"] >= 10]        # too few chunks: no point
            a = [row["alpha"] for row in rows]
            for key, style, name in (("on", "-", "RETRO[ON]"), ("off", "--", "RETRO[OFF]"), ("baseline", ":", "baseline")):
                ax.plot(a, [row[key] for row in rows], style, label=name)
            ax.set(title=res["label"], xlabel="overlap r(C) at most alpha")
            share = ax.twinx()
            share.fill_between(a, [row["share"] for row in rows], alpha=0.1, color="grey")
            share.set(ylim=(0, 1), ylabel="share of held-out chunks")
        axes[0][0].set(ylabel="held-out bits per byte")
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
