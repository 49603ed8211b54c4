"""
Speed and memory of the model, the benchmarks of bench/RESULTS.md's "Performance" and "bf16 on CPUs with AMX":

    python bench/speed.py train       # training and forward tokens/s, peak memory: retro.py against labml-nn and
                                      # retro-pytorch on one matched config (fp32, 2 threads)
    python bench/speed.py generate    # RETRO.generate with its cache against recomputing every token
    python bench/speed.py dtype       # fp32 against bf16 autocast: a training step, the embedder, neighbours kept
    python bench/speed.py step --db data/text+web   # where the time of train.py's own step goes, fp32 and bf16

`python bench/speed.py COMMAND -h` says what each measures and how. retro.py, build_db.py and train.py are imported
inside the commands that use them: `train` reads the peak RSS of a fresh process that imports one implementation.
"""

import argparse
import ctypes
import itertools
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
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ---- train: three implementations on the matched config ------------------------------------------------------------

IMPLS = ("ours", "ours-no-recompute", "ours-checkpoint-encoder", "labml", "lucidrains", "lucidrains-4heads")
# the matched config (`generate` uses it too)
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


# ---- one builder per implementation --------------------------------------------------------------------------------
# Each returns (model, optimizer, train_loss(tokens, neighbours), eval_loss(tokens, neighbours), describe()).
# tokens is (B, SEQ + 1): inputs tokens[:, :-1], targets tokens[:, 1:]. describe() reports the model as built,
# read back from its modules, with every layer index 0-based.

def build_ours(recompute_ffw: bool = True, checkpoint_encoder: bool = False):
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


# ---- measuring one implementation in this process ------------------------------------------------------------------

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


# ---- every implementation, each in a fresh process -----------------------------------------------------------------

def run_all(impls, steps: int, rounds: int, release: bool = False):
    """Each round runs every implementation once, in a fresh process, one after another (the machine has 2
    cores); rounds alternate the order, and the table reports each number's median over the rounds, so a
    slow spell of the machine does not favour whoever ran during it."""
    runs = {impl: [] for impl in impls}
    for k in range(rounds):
        for impl in impls if k % 2 == 0 else impls[::-1]:
            print(f"round {k + 1}/{rounds}: {impl} ...", file=sys.stderr, flush=True)
            env = {**os.environ, **({"MALLOC_TRIM_THRESHOLD_": "0"} if release else {})}
            proc = subprocess.run([sys.executable, __file__, "train", "--impl", impl, "--steps", str(steps)],
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


def train_arguments(ap):
    ap.add_argument("--impl", choices=IMPLS, help="run this one implementation here and print one JSON line")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, for the full comparison")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up step (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every implementation (default 3)")
    ap.add_argument("--release_memory", action="store_true", help="run every implementation with "
                    "MALLOC_TRIM_THRESHOLD_=0, so that glibc returns freed memory to the system and peak RSS "
                    "follows the memory in use rather than what the allocator keeps cached")
    ap.add_argument("--profile", action="store_true", help="with --impl: the top of torch.profiler's table "
                    "(self CPU time) for 2 training steps after 1 warm-up step, instead of the timing")


def cmd_train(args):
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
    python bench/speed.py train                      # every implementation, each in a fresh subprocess,
                                                     # one after another; prints markdown tables
    python bench/speed.py train --impl ours          # one implementation in this process; one JSON line
    python bench/speed.py train --impls ours,labml --steps 10

The peers are only needed here, never by retro.py. They declare torch (and heavy extras) as dependencies,
so install them without dependencies to keep the installed torch, plus the small pure-python modules they
import:
    pip install --no-deps labml-nn==0.5.1 retro-pytorch==0.3.9 labml==0.5.3 einops==0.8.2
retro_pytorch also imports faiss (faiss-cpu, as build_db.py does) and autofaiss, whose import pulls in
embedding-reader, pandas and pyarrow; autofaiss is only used to build indexes, so when it cannot be imported
this script puts an empty stand-in module in its place before importing retro_pytorch.
"""
    if args.impl and args.profile:
        profile(args.impl)
    elif args.impl:
        print(json.dumps(run_one(args.impl, args.steps)))
    else:
        impls = [i.strip() for i in args.impls.split(",") if i.strip()]
        unknown = set(impls) - set(IMPLS)
        if unknown:
            args.error(f"unknown implementations {sorted(unknown)}; choose from {IMPLS}")
        run_all(impls, args.steps, args.rounds, args.release_memory)



# ---- generate: the cache against recomputing -----------------------------------------------------------------------

def fake_retriever(K, M, vocab):
    def retrieve(chunk):
        g = torch.Generator().manual_seed(int((chunk * torch.arange(1, M + 1)).sum()) % (2 ** 31))
        return torch.randint(1, vocab, (chunk.size(0), K, 2 * M), generator=g)
    return retrieve


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def generate_arguments(p):
    p.add_argument("--new_tokens", type=int, default=512)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs of each; the median is reported")


def cmd_generate(args):
    """
Generation speed: RETRO.generate with its cache (self-attention keys and values, each chunk's encoded
neighbours computed once) against recomputing the whole sequence for every new token, which is what the
other public RETRO implementations do. Both must give the same greedy tokens.

    python bench/speed.py generate                 # matched config, batch 1, 64-token prompt, 512 new tokens

The retriever is a stand-in that returns the same neighbours for the same chunk (a seeded function of the
chunk's tokens), so the numbers measure the model; a real retrieval (MiniLM + faiss) costs extra per chunk,
reported once at the end when the database data/text exists.
"""
    from retro import RETRO, RetroConfig
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = RetroConfig(vocab_size=VOCAB, block_size=SEQ, chunk_len=CHUNK, n_layer=LAYERS, n_head=HEADS,
                      n_embd=WIDTH, cca_layers=CCA_LAYERS, enc_n_layer=ENC_LAYERS, enc_n_head=HEADS,
                      enc_n_embd=WIDTH)
    model = RETRO(cfg).eval()
    retrieve = fake_retriever(K, cfg.chunk_len, cfg.vocab_size)
    prompt = torch.randint(1, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    gen = lambda use_cache: model.generate(prompt, args.new_tokens, retrieve, top_k=1, use_cache=use_cache)
    gen(True)                                                               # warm-up
    t_cache, out_cache = timed(lambda: gen(True), args.repeats)
    t_full, out_full = timed(lambda: gen(False), args.repeats)
    assert torch.equal(out_cache, out_full), "cached and recomputed greedy outputs differ"
    n = args.new_tokens
    print(f"| generation, batch 1, {args.prompt}-token prompt, {n} new tokens | tokens/s | seconds |")
    print("|---|---|---|")
    print(f"| recompute everything per token (peers' method) | {n / t_full:.1f} | {t_full:.1f} |")
    print(f"| RETRO.generate, cached | {n / t_cache:.1f} | {t_cache:.2f} |")
    print(f"speed-up {t_full / t_cache:.1f}x, identical greedy output: yes (median of {args.repeats} runs each)")
    db = ROOT / "data" / "text"
    if (db / "meta.json").exists():
        from build_db import Retriever
        r = Retriever(db, "cpu")
        chunk = torch.as_tensor(r.stream[:64].astype("int64"))[None]
        r(chunk)
        t, _ = timed(lambda: r(chunk), 5)
        print(f"a real retrieval (MiniLM embedding + faiss search) of one chunk: {t * 1000:.0f} ms")


# ---- dtype: fp32 against bf16 autocast -----------------------------------------------------------------------------

DTYPES = (torch.float32, torch.bfloat16)


def train_step_seconds(model, optimizer, batch, dtype, backward_in_autocast: bool = False) -> float:
    import build_db
    t = time.perf_counter()
    with build_db.autocast("cpu", dtype):
        loss = model(*batch)[1]
        if backward_in_autocast:            # as train.py does: the backward pass's products under autocast too
            loss.backward()
    if not backward_in_autocast:
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def recall(db32: str, db16: str) -> dict:
    """Share of each chunk's stored neighbours (as sets) that the bf16 database keeps, per split."""
    out = {}
    for split in ("train", "val"):
        a, b = (np.load(Path(d) / f"{split}_neighbour_ids.npy") for d in (db32, db16))
        out[split] = float(np.mean([len(np.intersect1d(x, y)) / len(x) for x, y in zip(a, b)]))
    return out


def dtype_arguments(p):
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunks", type=int, default=512)
    p.add_argument("--db32", default="")
    p.add_argument("--db16", default="")


def cmd_dtype(args):
    """
fp32 against bf16 autocast on this machine, side by side in one process: a training step of train.py's default
model, the embedder's rate, and (given two databases of one text) how many stored neighbours bf16 keeps.

    python bench/speed.py dtype                                         # training step and embedder
    python bench/speed.py dtype --db32 data/text_fp32 --db16 data/text  # + neighbours kept (recall@2)

Training: one step = forward + loss + backward + AdamW on a batch of 8 x 512 random tokens with K = 2 random
neighbours (train.py's defaults, vocabulary 4,096), --steps timed steps after one warm-up, the two formats
alternating for --rounds rounds; tokens/s from the median step. Embedder: MiniLM on --chunks chunks of text.txt
(64 tokens of the GPT-style tokenizer of the database, or of a BPE trained here), in batches of 64, same rounds.
"""
    import build_db
    from retro import RETRO, RetroConfig
    from train import TrainConfig
    print(f"CPU: AMX {torch.cpu._is_amx_tile_supported()}, AVX-512 bf16 {torch.cpu._is_avx512_bf16_supported()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; auto picks "
          f"{build_db.resolve_dtype('auto', 'cpu')[1]}")
    cfg, g = TrainConfig(), torch.Generator().manual_seed(0)
    mc = RetroConfig(**{k: v for k, v in asdict(cfg).items() if k in RetroConfig.__dataclass_fields__})
    B, T, M, K = cfg.batch_size, cfg.block_size, cfg.chunk_len, cfg.n_neighbours
    shapes = ((B, T), (B, T // M, K, 2 * M), (B, T))                       # tokens, neighbours, targets
    batch = tuple(torch.randint(1, mc.vocab_size, shape, generator=g) for shape in shapes)
    torch.manual_seed(0)
    model = RETRO(mc)
    optimizer = model.configure_optimizers(cfg.weight_decay, 1e-4)
    variants = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
                "bf16, backward under autocast": (torch.bfloat16, True)}
    times = {v: [] for v in variants}
    for d, inside in variants.values():
        train_step_seconds(model, optimizer, batch, d, inside)          # warm-up
    for _ in range(args.rounds):
        for v, (d, inside) in variants.items():
            times[v] += [train_step_seconds(model, optimizer, batch, d, inside) for _ in range(args.steps)]
    rate = {v: B * T / statistics.median(t) for v, t in times.items()}
    print("training step: " + ", ".join(f"{v} {r:,.0f} tokens/s ({r / rate['fp32']:.2f}x)" for v, r in rate.items()))

    docs = build_db.read_documents(str(build_db.DEFAULT_TEXT))
    tok = build_db.train_tokenizer(docs[:10], 4096)
    texts = tok.decode_batch(build_db.token_stream(tok, docs[:10], M).reshape(-1, M)[:args.chunks].tolist())
    embedders = {d: build_db.Embedder(build_db.DEFAULT_BERT, "mean", "cpu", str(d)[6:]) for d in DTYPES}
    etimes = {d: [] for d in DTYPES}
    for _ in range(args.rounds):
        for d, e in embedders.items():
            t = time.perf_counter()
            for i in range(0, len(texts), 64):
                e(texts[i:i + 64])
            etimes[d].append(time.perf_counter() - t)
    erate = {d: len(texts) / statistics.median(t) for d, t in etimes.items()}
    print(f"embedder: fp32 {erate[torch.float32]:.0f} chunks/s, bf16 {erate[torch.bfloat16]:.0f} chunks/s: "
          f"{erate[torch.bfloat16] / erate[torch.float32]:.2f}x")
    if args.db32 and args.db16:
        r = recall(args.db32, args.db16)
        print(f"stored neighbours kept by the bf16 database (recall@K): training {r['train']:.4f}, "
              f"validation {r['val']:.4f}")


# ---- step: train.py's own step, phase by phase ---------------------------------------------------------------------

PHASES = ("batch", "forward", "backward", "clip", "optimizer")


def timed_step(model, optimizer, batch, ctx, clip: float) -> dict:
    """One step of train.py's loop (one micro-step), each phase timed."""
    t, times = time.perf_counter(), {}

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        times[name], t = now - t, now
    x, y, nb = batch()
    lap("batch")
    with ctx:
        loss = model(x, nb, y)[1]
        lap("forward")
        loss.backward()
    lap("backward")
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    lap("clip")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("optimizer")
    return times


def step_arguments(p):
    p.add_argument("--db", default="data/text+web")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fixed", action="store_true", help="also time one fixed random batch")
    p.add_argument("--dtypes", default="float32,bfloat16", help="the formats, alternating step by step")
    p.add_argument("--flush_denormal", action="store_true", help="torch.set_flush_denormal(True) first")
    p.add_argument("--ops", type=int, default=0, help="then profile one step of each format: its N costliest ops")
    p.add_argument("--neighbours", default="", help="comma-separated K, each its own model (default: train.py's K)")


def cmd_step(args):
    """
Where the time of a training step goes, fp32 against bf16 autocast, in train.py's own loop: its batches (fresh every
step, from the database), its model, loss, gradient clipping and AdamW, each phase timed on its own.

    python bench/speed.py step --db data/text+web                  # train.py's default model and batches
    python bench/speed.py step --db data/text+web --fixed          # + one fixed random batch, as `dtype` times
    python bench/speed.py step --db data/text+web --dtypes float32  # one format alone, no alternation
    python bench/speed.py step --db data/text+web --dtypes float32 --neighbours 2,1,0   # what retrieval costs

Each format (and each K of --neighbours) trains its own copy of the model (the same initial weights) for --steps
steps after --warmup, the variants alternating step by step so that all see the same machine; medians per phase.
With --fixed, more variants train on one random batch (uniform token ids, no padding), as `speed.py dtype` times.
On a CPU with AMX an fp32 step right after a bf16 one runs ~17% slower than fp32 alone (bench/RESULTS.md): for
the ratio of the two formats, time each alone (--dtypes float32, then --dtypes bfloat16), one after the other.
"""
    import build_db
    import train
    torch.set_flush_denormal(args.flush_denormal)
    db = build_db.open_db(args.db)
    Ks = [int(k) for k in args.neighbours.split(",")] if args.neighbours else [train.TrainConfig.n_neighbours]
    variants = {}
    for K in Ks:
        cfg = train.TrainConfig(n_neighbours=K)
        data = train.Data(db, cfg)
        g = torch.Generator().manual_seed(0)
        B, T, M, V = cfg.batch_size, cfg.block_size, cfg.chunk_len, db.meta["vocab_size"]
        fixed = tuple(torch.randint(1, V, s, generator=g) for s in ((B, T), (B, T), (B, T // M, K, 2 * M)))
        fixed = fixed if K else (*fixed[:2], None)          # as train.Data gives without neighbours
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            for kind in ("real", "fixed") if args.fixed else ("real",):
                model, optimizer, _ = train.build_model(cfg, db, "cpu")
                steps = itertools.count(1)          # each variant reads the same batches: train.py's steps 1, 2, ...
                batch = ((lambda c=steps, data=data: data.batch("train", next(c), 0, 0)) if kind == "real"
                         else (lambda fixed=fixed: fixed))
                name = f"{str(dtype)[6:]} {kind}" + (f" K={K}" if len(Ks) > 1 else "")
                variants[name] = (model, optimizer, batch, build_db.autocast("cpu", dtype))
    times = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for v, (model, optimizer, batch, ctx) in variants.items():
            t = timed_step(model, optimizer, batch, ctx, cfg.grad_clip)
            if i >= args.warmup:
                times[v].append(t)
    print(f"{torch.get_num_threads()} threads, AMX {torch.cpu._is_amx_tile_supported()}; {B} x {T} tokens, "
          f"K={args.neighbours or K}; median seconds of {args.steps} steps")
    print(f"{'':18s}" + "".join(f"{ph:>10s}" for ph in PHASES) + f"{'step':>10s}{'tokens/s':>10s}")
    for v, ts in times.items():
        med = {ph: statistics.median(t[ph] for t in ts) for ph in PHASES}
        total = statistics.median(sum(t.values()) for t in ts)
        print(f"{v:18s}" + "".join(f"{med[ph]:10.3f}" for ph in PHASES) + f"{total:10.3f}{B * T / total:10,.0f}")
    for v, (model, optimizer, batch, ctx) in variants.items() if args.ops else ():
        with torch.profiler.profile() as prof:
            timed_step(model, optimizer, batch, ctx, cfg.grad_clip)
        print(f"\n{v}: the {args.ops} ops with the most time of their own in one step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops, max_name_column_width=40))


# ---- the commands --------------------------------------------------------------------------------------------------

COMMANDS = {"train": (cmd_train, train_arguments, "training tokens/s and memory: retro.py, labml-nn, retro-pytorch"),
            "generate": (cmd_generate, generate_arguments, "generation with the cache against recomputing"),
            "dtype": (cmd_dtype, dtype_arguments, "fp32 against bf16: a training step, the embedder, neighbours kept"),
            "step": (cmd_step, step_arguments, "train.py's step phase by phase, fp32 against bf16")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (run, add_arguments, summary) in COMMANDS.items():
        c = commands.add_parser(name, help=summary, description=run.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(c)
        c.set_defaults(run=run, error=c.error)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
