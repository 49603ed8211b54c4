"""
The copy task at train.py's default model size: can RETRO learn to read its neighbours at all?

Random tokens cannot be predicted, so the only way below ln V is retrieval: chunk u's first neighbour is
[C_u, C_{u+1}], the chunk and its true continuation, and its second a random pair of chunks (a distractor).
A model that copies F's tokens into the next chunk reaches a loss near 0 on every position that can see
neighbours (from the last token of chunk 0 on); one that ignores its neighbours stays at ln V.

    python bench/copy_task.py                         # train.py's defaults: V 4096, width 256, M 64, 8 x 512
    python bench/copy_task.py --set share_embedding=False cca_position_bias=False --ln_f_gain 1   # the paper's choices
    python bench/copy_task.py --small                 # the model of test_retro.py's copy test, 1 minute

Prints the mean loss of the positions that see neighbours on a fresh held-out batch every --eval_every
steps, and the verdict against the target (below 0.3 ln V within --steps).
"""

import argparse
import ast
import json
import math
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retro import RETRO, RetroConfig  # noqa: E402
from train import TrainConfig, get_lr  # noqa: E402


SMALL = ["batch_size=16", "block_size=16", "chunk_len=4", "n_layer=2", "n_head=2", "n_embd=128", "cca_layers=(1,)",
         "enc_n_layer=1", "enc_n_head=2", "enc_n_embd=128", "learning_rate=3e-3", "warmup_iters=0",
         "min_lr_ratio=1.0", "weight_decay=0.0"]


def copy_batch(B, T, M, V, step, distractors=1, misalign=False):
    """Random tokens (B, T), targets (B, T), neighbours (B, T // M, 1 + distractors, 2M): [C_u, C_{u+1}]
    first, then random pairs of chunks."""
    g = torch.Generator().manual_seed(step)
    seq = torch.randint(2, V, (B, T + M), generator=g)                      # ids 0, 1: padding, end of text
    true = seq.unfold(1, 2 * M, M)[:, :T // M, None]                         # (B, L, 1, 2M)
    if misalign:    # the true neighbour starts up to M/2 tokens before or after its chunk, as real ones do
        seq = torch.cat((torch.randint(2, V, (B, M), generator=g), seq, torch.randint(2, V, (B, M), generator=g)), 1)
        shift = torch.randint(-M // 2, M // 2 + 1, (B, T // M), generator=g)
        starts = M + torch.arange(T // M) * M + shift                          # (B, L)
        true = torch.gather(seq, 1, (starts[..., None] + torch.arange(2 * M)).flatten(1)).view(B, T // M, 1, 2 * M)
        seq = seq[:, M:-M]
    other = torch.randint(2, V, (B, T // M, distractors, 2 * M), generator=g)
    return seq[:, :T], seq[:, 1:T + 1], torch.cat((true, other), 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="default 300 (200 with --small)")
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--distractors", type=int, default=1, help="random neighbours beside the true one")
    p.add_argument("--set", nargs="*", default=[], help="RetroConfig or TrainConfig overrides, key=value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ln_f_gain", type=float, default=0.0, help="start the final norm's gain here (1: without "
                   "deviation 7; 0: the model's own init)")
    p.add_argument("--json", default="", help="append the result as a JSON line to this file")
    p.add_argument("--misalign", action="store_true", help="shift each true neighbour by up to M/2 tokens")
    p.add_argument("--small", action="store_true", help="the model and schedule of test_retro.py's copy test at "
                   "V 4096 (width 128, 2 layers, M 4, 16 x 16 tokens, constant lr 3e-3, 200 steps, no distractor)")
    args = p.parse_args(argv)
    if args.small:
        args.set = SMALL + args.set
        args.steps, args.distractors, args.eval_every = args.steps or 200, 0, 50
    args.steps = args.steps or 300
    tc = TrainConfig()
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    for k in [k for k in overrides if k in {f.name for f in fields(TrainConfig)}]:
        setattr(tc, k, overrides.pop(k) if k not in {f.name for f in fields(RetroConfig)} else overrides[k])
    shared = {f.name for f in fields(RetroConfig)} & {f.name for f in fields(TrainConfig)}
    cfg = RetroConfig(**{**{k: getattr(tc, k) for k in shared}, "vocab_size": args.vocab_size, **overrides})
    B, T, M, V = tc.batch_size, tc.block_size, cfg.chunk_len, cfg.vocab_size
    torch.manual_seed(args.seed)
    model = RETRO(cfg)
    if args.ln_f_gain:
        torch.nn.init.constant_(model.ln_f.weight, args.ln_f_gain)
    opt = model.configure_optimizers(tc.weight_decay, tc.learning_rate, (tc.beta1, tc.beta2))
    print(f"copy task: {model.num_params() / 1e6:.2f}M parameters, V {V}, M {M}, {B} x {T} tokens, "
          f"1 true + {args.distractors} random neighbours, lr {tc.learning_rate} ({tc.warmup_iters} warm-up), "
          f"{args.steps} steps; ln V = {math.log(V):.2f}, target < {0.3 * math.log(V):.2f}")
    print("config:", {k: v for k, v in asdict(cfg).items() if v != getattr(RetroConfig, k, None)})
    tc.max_iters = args.steps
    held_out = copy_batch(B, T, M, V, 10 ** 9, args.distractors, args.misalign)
    curve, t0 = {}, time.time()

    def evaluate():
        model.eval()
        idx, targets, nb = held_out
        with torch.no_grad():
            x = model.hidden(idx, nb)[:, M - 1:]                               # positions that see neighbours
            loss = F.cross_entropy(model.lm_head(x).flatten(0, 1), targets[:, M - 1:].flatten()).item()
        model.train()
        return loss

    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            curve[step] = evaluate()
            print(f"step {step}: held-out loss {curve[step]:.3f} ({curve[step] / math.log(V):.2f} ln V), "
                  f"{time.time() - t0:.0f}s", flush=True)
        if step == args.steps:
            break
        for group in opt.param_groups:
            group["lr"] = get_lr(tc, step)
        idx, targets, nb = copy_batch(B, T, M, V, step, args.distractors, args.misalign)
        loss = model(idx, nb, targets)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    final = curve[args.steps]
    ok = final < 0.3 * math.log(V)
    print(f"{'PASS' if ok else 'FAIL'}: held-out loss {final:.3f} after {args.steps} steps "
          f"({final / math.log(V):.2f} ln V; target < 0.30 ln V)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(dict(set=args.set, ln_f_gain=args.ln_f_gain, vocab_size=V, distractors=args.distractors, seed=args.seed,
                                    curve=curve, passed=ok)) + "\n")
    return curve


if __name__ == "__main__":
    main()
