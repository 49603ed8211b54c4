r"""
Training and forward throughput, and peak memory, of three RETRO implementations on one matched config.

What it measures, for each implementation, on CPU in fp32 with torch.set_num_threads(2) and seed 0:
    train tokens/s    one step = zero_grad + forward + cross-entropy + backward + AdamW step (lr 1e-4,
                      weight decay 0.1) on a batch of 8 x 512 random token ids; 1 warm-up step, then
                      --steps timed steps; tokens/s = 8 * 512 / median step time. Ours is called as
                      a user would: loss = model(x, neighbours, targets)[1] (the default returns no logits
                      and never holds the (B, T, V) logits)
    forward tokens/s  the same forward + loss under torch.no_grad() in eval mode
    peak RSS          resource.getrusage(RUSAGE_SELF).ru_maxrss of a fresh process that imports torch and
                      that one implementation, builds the model and trains, read before the forward-only
                      runs; the RSS after the imports and the model build (before any step) is reported
                      too, as a baseline
    faults, sys       minor page faults and system CPU seconds per timed training step (getrusage)
    peak in use       the most memory glibc's malloc had handed out and not taken back (mallinfo2), read
                      after every op of one more training step (not timed): what the implementation holds at
                      its peak. Peak RSS also counts the freed memory the allocator keeps (fragmentation),
                      and the libraries' own pages
    parameters        sum of numel over model.parameters() (tied weights counted once)

The matched config (retro.py's names; the peers' own names are in their builders below):
    vocab 30522, sequence 512, chunk 64, 2 neighbours of 128 tokens each (8 chunks -> neighbours (8, 8, 2, 128)),
    decoder 6 layers of width 256 with 4 heads of 64 and feed-forward 1024, chunked cross-attention after
    0-based layers 2 and 5, neighbour encoder 2 layers of width 256 (4 heads of 64, feed-forward 1024) with
    cross-attention to the retrieving chunk in its first layer only. Token ids are >= 1 (0 is padding).

Implementations:
    ours               retro.py in the repository root with its defaults (recompute_ffw=True: the feed-forward's
                       GELU is recomputed in backward instead of stored)
    ours-no-recompute  the same with recompute_ffw=False: faster, more memory
    ours-checkpoint-encoder  an experiment: the neighbour encoder under torch.utils.checkpoint (nothing of it
                       kept for backward; it runs again there)
    labml              labml-nn 0.5.1, labml_nn.transformers.retro.model (RetroModel + NearestNeighborEncoder)
    lucidrains         retro-pytorch 0.3.9 as shipped: RETRO(heads=4) is ignored, it builds 8 heads of 64
    lucidrains-4heads  the same with 4 heads, by passing heads=4 to its Encoder and Decoder at build time
                       (a runtime patch of the module's globals; site-packages is not edited)

Usage:
    python bench/bench_train.py                      # every implementation, each in a fresh subprocess,
                                                     # one after another; prints markdown tables
    python bench/bench_train.py --impl ours          # one implementation in this process; one JSON line
    python bench/bench_train.py --impls ours,labml --steps 10

The peers are only needed here, never by retro.py. They declare torch (and heavy extras) as dependencies,
so install them without dependencies to keep the installed torch, plus the small pure-python modules they
import:
    pip install --no-deps labml-nn==0.5.1 retro-pytorch==0.3.9 labml==0.5.3 einops==0.8.2
retro_pytorch also imports faiss (faiss-cpu, as build_db.py does) and autofaiss, whose import pulls in
embedding-reader, pandas and pyarrow; autofaiss is only used to build indexes, so when it cannot be imported
this script puts an empty stand-in module in its place before importing retro_pytorch.
"""

import argparse
import ctypes
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("ours", "ours-no-recompute", "ours-checkpoint-encoder", "labml", "lucidrains", "lucidrains-4heads")

# ---- the matched config --------------------------------------------------------------------------------
VOCAB, SEQ, CHUNK, K, R, BATCH = 30522, 512, 64, 2, 128, 8
WIDTH, LAYERS, HEADS, HEAD_DIM, FFW_MULT = 256, 6, 4, 64, 4
CCA_LAYERS = (2, 5)            # 0-based decoder layers with chunked cross-attention
ENC_LAYERS, ENC_CROSS = 2, (0,)  # encoder depth; 0-based encoder layers that cross-attend to the chunk
LR, WEIGHT_DECAY = 1e-4, 0.1


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


class InUse(TorchDispatchMode):
    """The memory glibc's malloc has handed out and not taken back (mallinfo2: uordblks + hblkhd), read after every
    torch op, forward and backward: the peak of what the implementation holds, whatever the allocator keeps cached
    around it (peak RSS counts that too). Linux with glibc >= 2.33 only."""

    class Info(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    def __init__(self):
        super().__init__()
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallinfo2.restype = InUse.Info
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        info = self.libc.mallinfo2()
        self.peak = max(self.peak, info.uordblks + info.hblkhd)
        return out


# ---- one builder per implementation ----------------------------------------------------------------------
# Each returns (model, optimizer, train_loss(tokens, neighbours), eval_loss(tokens, neighbours), describe()).
# tokens is (B, SEQ + 1): inputs tokens[:, :-1], targets tokens[:, 1:]. describe() reports the model as built,
# read back from its modules, with every layer index 0-based.

def build_ours(recompute_ffw: bool = True, checkpoint_encoder: bool = False):
    sys.path.insert(0, str(ROOT))
    from retro import RETRO, RetroConfig

    cfg = RetroConfig(vocab_size=VOCAB, block_size=SEQ, chunk_len=CHUNK, n_layer=LAYERS, n_head=HEADS,
                      n_embd=WIDTH, cca_layers=CCA_LAYERS, enc_n_layer=ENC_LAYERS, enc_n_head=HEADS,
                      enc_n_embd=WIDTH, enc_cross_layers=ENC_CROSS, ffw_mult=FFW_MULT,
                      recompute_ffw=recompute_ffw)
    model = RETRO(cfg)
    opt = model.configure_optimizers(weight_decay=WEIGHT_DECAY, learning_rate=LR)
    if checkpoint_encoder:          # an experiment: keep nothing of the encoder for backward, run it again there
        import torch.utils.checkpoint
        encode = model.encoder.forward
        model.encoder.forward = lambda *args: torch.utils.checkpoint.checkpoint(encode, *args, use_reentrant=False)

    def train_loss(tokens, nb):                 # the default call: the loss without the (B, T, V) logits
        return model(tokens[:, :-1], nb, tokens[:, 1:])[1]

    def eval_loss(tokens, nb):
        return model(tokens[:, :-1], nb, tokens[:, 1:])[1]

    def describe():
        blocks, enc = model.blocks, model.encoder.layers
        return dict(layers=len(blocks), heads=sorted({b.attn.n_head for b in blocks}),
                    head_dim=WIDTH // blocks[0].attn.n_head,
                    cca_at=[i for i, b in enumerate(blocks) if b.cca is not None],
                    cca_heads=sorted({b.cca.attn.n_head for b in blocks if b.cca is not None}),
                    d_ff=blocks[0].ffw.fc.out_features, enc_layers=len(enc),
                    enc_heads=sorted({l.attn.n_head for l in enc}),
                    enc_cross_at=[i for i, l in enumerate(enc) if l.cross is not None])
    return model, opt, train_loss, eval_loss, describe


def build_labml():
    from labml_nn.transformers.retro.model import NearestNeighborEncoder, RetroModel

    # Its layer indices are 0-based (RetroModel.forward: `for p in range(len(self.attn))`, `p in ca_layers`).
    # Its tutorial (train.py) gives the encoder one cross-attention layer; here it is layer 0, as in ours.
    # The encoder reads the decoder's embedding of the neighbours (no embedding of its own).
    encoder = NearestNeighborEncoder(chunk_len=CHUNK, n_layers=ENC_LAYERS, ca_layers=set(ENC_CROSS),
                                     d_model=WIDTH, n_heads=HEADS, d_k=HEAD_DIM, d_ff=FFW_MULT * WIDTH)
    model = RetroModel(n_vocab=VOCAB, d_model=WIDTH, n_layers=LAYERS, ca_layers=set(CCA_LAYERS),
                       chunk_len=CHUNK, n_heads=HEADS, d_k=HEAD_DIM, d_ff=FFW_MULT * WIDTH, encoder=encoder)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def loss(tokens, nb):
        logits = model(tokens[:, :-1], nb)                                  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def describe():
        return dict(layers=len(model.attn), heads=sorted({a.n_heads for a in model.attn}),
                    head_dim=model.attn[0].d_k, cca_at=sorted(model.ca_layers),
                    cca_heads=sorted({c.n_heads for c in model.cca}), d_ff=model.ffw[0].lin1.out_features,
                    enc_layers=len(encoder.attn), enc_heads=sorted({a.n_heads for a in encoder.attn}),
                    enc_cross_at=sorted(encoder.ca_layers))
    return model, opt, loss, loss, describe


def import_retro_pytorch():
    try:
        import autofaiss  # noqa: F401  (imported by retro_pytorch.retrieval, used only to build indexes)
    except ImportError:
        stub = types.ModuleType("autofaiss")
        stub.build_index = None
        sys.modules["autofaiss"] = stub
    import retro_pytorch.retro_pytorch as rp
    return rp


@contextmanager
def heads_patched(rp, heads):
    """RETRO.__init__ takes `heads` but never passes it on, so Encoder and Decoder keep their default of 8.
    While the model is built, make the module's Encoder and Decoder names build `heads` heads instead."""
    saved = rp.Encoder, rp.Decoder
    rp.Encoder, rp.Decoder = partial(saved[0], heads=heads), partial(saved[1], heads=heads)
    try:
        yield
    finally:
        rp.Encoder, rp.Decoder = saved


def build_lucidrains(patch_heads: bool):
    rp = import_retro_pytorch()
    # Its layer numbers are 1-based (`for layer_num in range(1, depth + 1)`), so 0-based 2, 5 -> 3, 6.
    # enc_cross_attn_layers=None would give every encoder layer cross-attention; ours has it in the first.
    kwargs = dict(num_tokens=VOCAB, max_seq_len=SEQ, chunk_size=CHUNK, enc_dim=WIDTH, enc_depth=ENC_LAYERS,
                  enc_cross_attn_layers=tuple(i + 1 for i in ENC_CROSS), dec_dim=WIDTH, dec_depth=LAYERS,
                  dec_cross_attn_layers=tuple(i + 1 for i in CCA_LAYERS), heads=HEADS, dim_head=HEAD_DIM)
    if patch_heads:
        with heads_patched(rp, HEADS):
            model = rp.RETRO(**kwargs)
    else:
        model = rp.RETRO(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def train_loss(tokens, nb):
        return model(tokens, nb, return_loss=True)          # it splits inputs and targets itself

    def eval_loss(tokens, nb):
        # return_loss=True asserts training mode, so in eval mode take its logits
        logits = model(tokens[:, :-1], nb)                  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def describe():
        dec, enc = model.decoder.layers, model.encoder.layers
        inner = dec[0][0].fn.to_q.out_features
        return dict(layers=len(dec), heads=sorted({l[0].fn.heads for l in dec}),
                    head_dim=inner // dec[0][0].fn.heads,
                    cca_at=[i for i, l in enumerate(dec) if l[1] is not None],
                    cca_heads=sorted({l[1].fn.cross_attn.heads for l in dec if l[1] is not None}),
                    d_ff=dec[0][2].fn.ff[0].out_features, enc_layers=len(enc),
                    enc_heads=sorted({l[0].fn.heads for l in enc}),
                    enc_cross_at=[i for i, l in enumerate(enc) if l[1] is not None])
    return model, opt, train_loss, eval_loss, describe


BUILDERS = {"ours": build_ours, "ours-no-recompute": partial(build_ours, recompute_ffw=False),
            "ours-checkpoint-encoder": partial(build_ours, checkpoint_encoder=True), "labml": build_labml,
            "lucidrains": partial(build_lucidrains, patch_heads=False),
            "lucidrains-4heads": partial(build_lucidrains, patch_heads=True)}


# ---- measuring one implementation in this process ------------------------------------------------------

def step_seconds(step, steps: int):
    """Seconds of each of `steps` steps after a warm-up one, and their minor page faults and system CPU seconds
    per step."""
    step()                                                   # warm-up
    times, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return times, (after.ru_minflt - before.ru_minflt) / steps, (after.ru_stime - before.ru_stime) / steps


def run_one(impl: str, steps: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, opt, train_loss, eval_loss, describe = BUILDERS[impl]()  # imports happen inside the builder
    rss_build = peak_rss_gib()                                       # before any step
    tokens = torch.randint(1, VOCAB, (BATCH, SEQ + 1))
    neighbours = torch.randint(1, VOCAB, (BATCH, SEQ // CHUNK, K, R))
    losses = []

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = train_loss(tokens, neighbours)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    def forward_step():
        losses.append(eval_loss(tokens, neighbours).item())

    model.train()
    train_times, faults, sys_s = step_seconds(train_step, steps)
    train_peak = peak_rss_gib()                              # training's peak, before the forward-only runs
    try:                                                     # one more step, untimed, to read the memory in use
        with InUse() as in_use:
            train_step()
        in_use_peak = in_use.peak / 2**30
    except (OSError, AttributeError):                        # not glibc >= 2.33
        in_use_peak = float("nan")
    model.eval()
    with torch.no_grad():
        fwd_times = step_seconds(forward_step, steps)[0]
    train_s, fwd_s = statistics.median(train_times), statistics.median(fwd_times)
    assert all(map(math.isfinite, losses)), f"{impl}: non-finite loss {losses}"
    return dict(impl=impl, params=sum(p.numel() for p in model.parameters()), steps=steps,
                train_tok_s=BATCH * SEQ / train_s, fwd_tok_s=BATCH * SEQ / fwd_s,
                train_step_s=[round(t, 3) for t in train_times], fwd_step_s=[round(t, 3) for t in fwd_times],
                first_loss=losses[0], last_train_loss=losses[steps], peak_rss_gib=train_peak,
                peak_in_use_gib=in_use_peak, minor_faults_per_step=round(faults), sys_s_per_step=round(sys_s, 3),
                rss_after_build_gib=rss_build, threads=torch.get_num_threads(), torch=torch.__version__,
                config=describe())


def profile(impl: str, rows: int = 20):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, opt, train_loss, _, _ = BUILDERS[impl]()
    tokens = torch.randint(1, VOCAB, (BATCH, SEQ + 1))
    neighbours = torch.randint(1, VOCAB, (BATCH, SEQ // CHUNK, K, R))
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        train_loss(tokens, neighbours).backward()
        opt.step()
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ---- every implementation, each in a fresh process ---------------------------------------------------------

def run_all(impls, steps: int, rounds: int, release: bool = False):
    """Each round runs every implementation once, in a fresh process, one after another (the machine has 2
    cores); rounds alternate the order, and the table reports each number's median over the rounds, so a
    slow spell of the machine does not favour whoever ran during it."""
    runs = {impl: [] for impl in impls}
    for k in range(rounds):
        for impl in impls if k % 2 == 0 else impls[::-1]:
            print(f"round {k + 1}/{rounds}: {impl} ...", file=sys.stderr, flush=True)
            env = {**os.environ, **({"MALLOC_TRIM_THRESHOLD_": "0"} if release else {})}
            proc = subprocess.run([sys.executable, __file__, "--impl", impl, "--steps", str(steps)],
                                  capture_output=True, text=True, env=env)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(f"{impl} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[impl].append(json.loads(lines[-1]))
            print(lines[-1], file=sys.stderr, flush=True)
    results = {}
    for impl, rs in runs.items():
        if rs:
            results[impl] = {**rs[0], **{key: statistics.median(r[key] for r in rs)
                                         for key in ("train_tok_s", "fwd_tok_s", "peak_rss_gib", "peak_in_use_gib",
                                                       "minor_faults_per_step", "sys_s_per_step")}}

    base = results.get("labml")
    ratio = lambda r, key: f"{r[key] / base[key]:.2f}" if base else "-"
    print(f"\nCPU fp32, 2 threads, batch {BATCH} x {SEQ} tokens; each run: median of {steps} steps after 1 "
          f"warm-up; table: median over {rounds} rounds (torch {torch.__version__})"
          + ("; every process with MALLOC_TRIM_THRESHOLD_=0" if release else "") + "\n")
    print("| implementation | parameters | train tokens/s | train vs labml | forward tokens/s | peak RSS GiB "
          "| peak RSS vs labml | peak in use GiB | in use vs labml | page faults / step | system s / step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for impl, r in results.items():
        print(f"| {impl} | {r['params'] / 1e6:.2f}M | {r['train_tok_s']:,.0f} | {ratio(r, 'train_tok_s')} "
              f"| {r['fwd_tok_s']:,.0f} | {r['peak_rss_gib']:.2f} | {ratio(r, 'peak_rss_gib')} "
              f"| {r['peak_in_use_gib']:.2f} | {ratio(r, 'peak_in_use_gib')} | {r['minor_faults_per_step']:,.0f} "
              f"| {r['sys_s_per_step']:.2f} |")

    print("\nAs built (layer indices 0-based; RSS after imports and model build, before any step):\n")
    print("| implementation | layers | heads x dim | CCA at | CCA heads | d_ff | enc layers | enc heads "
          "| enc cross at | first loss | RSS after build GiB |")
    print("|---|---:|---|---|---|---:|---:|---|---|---:|---:|")
    for impl, r in results.items():
        c = r["config"]
        print(f"| {impl} | {c['layers']} | {c['heads']} x {c['head_dim']} | {c['cca_at']} | {c['cca_heads']} "
              f"| {c['d_ff']} | {c['enc_layers']} | {c['enc_heads']} | {c['enc_cross_at']} "
              f"| {r['first_loss']:.3f} | {r['rss_after_build_gib']:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=IMPLS, help="run this one implementation here and print one JSON line")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, for the full comparison")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up step (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every implementation (default 3)")
    ap.add_argument("--release_memory", action="store_true", help="run every implementation with "
                    "MALLOC_TRIM_THRESHOLD_=0, so that glibc returns freed memory to the system and peak RSS "
                    "follows the memory in use rather than what the allocator keeps cached")
    ap.add_argument("--profile", action="store_true", help="with --impl: the top of torch.profiler's table "
                    "(self CPU time) for 2 training steps after 1 warm-up step, instead of the timing")
    args = ap.parse_args()
    if args.impl and args.profile:
        profile(args.impl)
    elif args.impl:
        print(json.dumps(run_one(args.impl, args.steps)))
    else:
        impls = [i.strip() for i in args.impls.split(",") if i.strip()]
        unknown = set(impls) - set(IMPLS)
        if unknown:
            ap.error(f"unknown implementations {sorted(unknown)}; choose from {IMPLS}")
        run_all(impls, args.steps, args.rounds, args.release_memory)


if __name__ == "__main__":
    main()
