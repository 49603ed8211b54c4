"""
The picture of chunked cross-attention in the README's "How RETRO works", measured on the model itself so that
it cannot drift from what retro.py does: for each chunk u, change only u's neighbours and mark the positions
whose output changes. Left: the output of the first CCA layer (which positions *read* chunk u's neighbours);
right: the logits (what they reach through the self-attention above it). A small model with the default
architecture (CCA in layers 2 and 5 of 6), chunks of M = 4 tokens, 8 chunks, float64, random weights.

    python bench/cca_figure.py --out bench/cca_figure.png       # needs matplotlib (bench only)
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retro import RETRO, RetroConfig  # noqa: E402


def reach(M: int = 4, L: int = 8, K: int = 2, seed: int = 0):
    """(L, T) booleans for the first CCA layer's output and for the logits: does position i change when
    only chunk u's neighbours do?"""
    torch.manual_seed(seed)
    cfg = RetroConfig(vocab_size=64, block_size=M * L, chunk_len=M, n_layer=6, n_head=2, n_embd=32,
                      cca_layers=(2, 5), enc_n_layer=2, enc_n_head=2, enc_n_embd=32)
    model = RETRO(cfg).double().eval()
    x = torch.randint(1, 64, (1, M * L))
    nb = torch.randint(1, 64, (1, L, K, 2 * M))
    seen = {}
    model.blocks[cfg.cca_layers[0]].cca.register_forward_hook(lambda mod, args, out: seen.update(cca=out))
    with torch.no_grad():
        logits = model(x, nb)[0]
        cca = seen["cca"]
        rows_cca, rows_logits = [], []
        for u in range(L):
            other = nb.clone()
            other[:, u] = torch.randint(1, 64, other[:, u].shape)
            logits_u = model(x, other)[0]
            rows_cca.append((seen["cca"] - cca).abs().amax(-1)[0] > 1e-12)
            rows_logits.append((logits_u - logits).abs().amax(-1)[0] > 1e-12)
    return torch.stack(rows_cca), torch.stack(rows_logits), M


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/cca_figure.png")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cca, logits, M = reach()
    L, T = cca.shape
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=120, sharey=True)
    for ax, grid, title in (
            (axes[0], cca, "positions that read chunk u's neighbours\n(output of the first CCA layer)"),
            (axes[1], logits, "logits that change with chunk u's neighbours\n(through the layers above)")):
        ax.imshow(grid.float(), cmap="Blues", vmin=0, vmax=1.6, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(T), [str(i) for i in range(T)], fontsize=6)
        ax.set_xticks([c * M - 0.5 for c in range(1, L)], minor=True)
        ax.grid(which="minor", axis="x", color="gray", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel(f"position i in the sequence (chunks of M = {M}: grey lines)")
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(range(L), [f"chunk {u}" for u in range(L)], fontsize=7)
    axes[0].set_ylabel("neighbours changed: those of")
    for u in range(L):           # the first position of each reading window: the chunk's last token
        axes[0].annotate("", xy=((u + 1) * M - 1, u), xytext=((u + 1) * M - 1 - 1.4, u),
                         arrowprops=dict(arrowstyle="->", color="tab:red", lw=0.8))
    fig.suptitle(f"Chunked cross-attention: chunk u's neighbours are read from its last token, position (u+1)M-1, "
                 f"for M positions; the first M-1 = {M - 1} read none", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    for u in range(L):
        pos = cca[u].nonzero().flatten().tolist()
        print(f"chunk {u}: read by positions {pos[0]}..{pos[-1]}" if pos else f"chunk {u}: read by no position < {T}")


if __name__ == "__main__":
    main()
