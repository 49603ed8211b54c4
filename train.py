"""
Train RETRO on a text file, measure what retrieval buys, and sample with retrieval.

    python train.py                                   # text.txt (builds data/text+web/ first if needed)
    python train.py --n_neighbours 0 --out_dir out/baseline     # the same decoder without retrieval
    python train.py --retrofit out/baseline/ckpt.pt --out_dir out/retrofit   # RETRO-fit that baseline
    torchrun --standalone --nproc_per_node=8 train.py # several GPUs, with PyTorch DDP
A trained model, beside the pipeline: extras/sample.py samples from it, extras/evaluate.py evaluates it with any
database (bits per byte by overlap); either can retrieve from a server (extras/server.py).

Every option is a field of TrainConfig below (`python train.py -h` lists them with their defaults). The file reads
as the run goes: configuration, data, the machine and the model, the loop; then evaluation, checkpoints, sampling.
"""

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import build_db
from build_db import SEPARATOR, DBConfig, DBError, Retriever, autocast, cli
from retro import RETRO, RetroConfig


@dataclass
class TrainConfig:
    data: str = "text.txt"          # text to train on (a file, a folder of .txt files, or .jsonl)
    db: str = ""                    # retrieval database, used as it is if it exists; empty: data/<name of the text>
    retrieval_texts: str = "auto"   # if the database is built: comma-separated texts to retrieve from, not train on;
                                    # auto: bench/texts/web.txt with the default text.txt, none with others
    out_dir: str = "out"            # where ckpt.pt goes
    # model (RetroConfig; the vocabulary comes from the database's tokenizer)
    block_size: int = 512           # tokens per training sequence (paper: 2048)
    chunk_len: int = 64             # paper m = 64
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 256
    cca_layers: tuple = (2, 5)      # 0-based decoder layers with chunked cross-attention
    enc_n_layer: int = 2
    enc_n_head: int = 4
    enc_n_embd: int = 256           # = n_embd: the encoder reads the decoder's embedding as it is (README: copy task)
    dropout: float = 0.0
    vocab_size: int = 4096          # BPE vocabulary, if the database has to be built
    n_neighbours: int = 2           # K neighbours per chunk; 0 trains the same decoder without retrieval
    retrofit: str = ""              # a baseline checkpoint: freeze its decoder, train encoder + CCA only
    synthetic: str = "auto"         # training: share of chunks whose last neighbour is an edited copy of their
                                    # continuation; auto: 0.5 where the database's retrieval outlook is below 50%
    # optimisation (paper, appendix C.1: AdamW, weight decay 0.1, warm-up, cosine decay to 10%)
    batch_size: int = 8             # sequences per micro-step and process
    grad_accum: int = 1             # micro-steps per optimizer step
    max_iters: int = 300            # about 10 minutes on 2 CPU cores with the defaults
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.1       # the cosine decays to this fraction of learning_rate
    warmup_iters: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation, logging, checkpoints
    eval_interval: int = 100        # evaluate and save a checkpoint every this many steps
    eval_iters: int = 8             # validation batches per periodic evaluation (the last one uses all)
    log_interval: int = 10
    resume: bool = False            # continue from out_dir/ckpt.pt
    seed: int = 1337
    device: str = "auto"            # auto: cuda, then mps, then cpu
    dtype: str = "auto"             # auto: bf16 where the GPU or CPU computes it, fp16 on older GPUs, else fp32
    compile: str = "auto"           # auto: the neighbour encoder under bf16 on a CPU, 200+ steps; encoder; model; none
    # the sample at the end of a run (and extras/sample.py's)
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 50

    def __post_init__(self):
        for name in ("block_size", "chunk_len", "batch_size", "grad_accum", "eval_interval", "eval_iters",
                     "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, not {getattr(self, name)}")
        for name in ("n_neighbours", "max_iters", "max_new_tokens", "temperature", "top_k", "dropout", "learning_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} cannot be negative ({getattr(self, name)})")
        if (share := str(self.synthetic)) != "auto" and not (share.replace(".", "", 1).isdigit() and float(share) <= 1):
            raise ValueError(f"--synthetic {self.synthetic} is a share of chunks: auto, or from 0 to 1")
        if self.compile not in ("auto", "encoder", "model", "none"):
            raise ValueError(f"--compile {self.compile} is not one of auto, encoder, model, none")
        if self.block_size % self.chunk_len:
            raise ValueError(f"--block_size {self.block_size} must be a multiple of --chunk_len {self.chunk_len}")
        model_config(self, {"vocab_size": self.vocab_size, "pad_id": 0})   # bad model flags fail now


def model_config(cfg: TrainConfig, meta: dict) -> RetroConfig:
    shared = {f.name for f in fields(RetroConfig)} - {"vocab_size", "pad_id"}
    try:
        return RetroConfig(**{k: v for k, v in asdict(cfg).items() if k in shared},
                           vocab_size=meta["vocab_size"], pad_id=meta["pad_id"])
    except AssertionError as e:
        raise ValueError(f"the model flags do not fit together: {e}") from None


# ---- data: chunk-aligned sequences with their precomputed neighbours ---------------------------------------

class Data:
    """A database's token streams and stored neighbours (memmaps), served as chunk-aligned sequences."""

    def __init__(self, db: build_db.Database, cfg: TrainConfig):
        self.cfg, self.meta, self.M = cfg, db.meta, cfg.chunk_len
        self.tokens, self.neighbours = db.tokens, dict(db.neighbours)      # a copy: extras/evaluate.py replaces one
        auto = SYNTHETIC_AUTO if cfg.n_neighbours and db.meta["overlap"] < 0.5 else 0.0     # why: see SYNTHETIC_AUTO
        self.synthetic = auto if cfg.synthetic == "auto" else float(cfg.synthetic)
        # bits per byte count the text's bytes: a byte-level BPE token is one character per byte, and the two
        # special tokens hold none (<|endoftext|> is not scored: see evaluate)
        special = (db.meta["pad_id"], db.meta["eot_id"])
        self.token_bytes = torch.tensor([0 if i in special else len(db.tokenizer.id_to_token(i))
                                         for i in range(db.tokenizer.get_vocab_size())])

    def sequences(self, split: str, starts):
        """Sequences of block_size tokens starting at the given chunks: inputs (B, T), targets (B, T) with -1
        at padding, and the neighbours of their chunks (B, T // M, K, R). Past the stream's end: padding."""
        T, M, K, pad = self.cfg.block_size, self.M, self.cfg.n_neighbours, self.meta["pad_id"]
        tok, nbs = self.tokens[split], self.neighbours[split]
        xy = np.stack([np.pad(tok[s * M:s * M + T + 1], (0, max(0, s * M + T + 1 - len(tok))), constant_values=pad)
                       for s in starts]).astype(np.int64)                       # (B, T + 1)
        nb = np.stack([np.pad(nbs[s:s + T // M, :K], ((0, max(0, s + T // M - len(nbs))), (0, 0), (0, 0)),
                              constant_values=pad) for s in starts]).astype(np.int64)   # (B, L, K, R)
        x, y = xy[:, :-1], xy[:, 1:].copy()
        y[y == pad] = -1
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(nb) if K else None

    def n_starts(self, split):
        return (len(self.tokens[split]) - self.cfg.block_size - 1) // self.M + 1

    def batch(self, split, it, micro, rank):
        """A random batch that depends only on (seed, step, micro-step, rank): --resume replays it exactly."""
        rng = np.random.default_rng([self.cfg.seed, it, micro, rank])
        starts = rng.integers(0, self.n_starts(split), self.cfg.batch_size)
        x, y, nb = self.sequences(split, starts)
        if split == "train" and self.synthetic and nb is not None:
            add_edited_copies(nb, self.tokens["train"], starts, self.M, self.synthetic, rng, self.meta["pad_id"],
                              self.meta["eot_id"])
        return x, y, nb

    def eval_batches(self, n_batches=None):
        """The held-out stream's windows of block_size tokens, in batches (n_batches: that many, evenly spaced).
        They overlap by one chunk, so that every token is scored once where it has the most context: all of the
        first window, the others but their first chunk, which the window before scored (evaluate)."""
        T, M = self.cfg.block_size, self.M
        stride = max(T // M - 1, 1)                                             # in chunks
        starts = stride * np.arange(1 + max(0, math.ceil((len(self.tokens["val"]) - 1 - T) / (stride * M))))
        batches = np.array_split(starts, math.ceil(len(starts) / self.cfg.batch_size))
        if n_batches and n_batches < len(batches):
            batches = [batches[i] for i in np.linspace(0, len(batches) - 1, n_batches).astype(int)]
        return batches


# ---- the model and the machine ------------------------------------------------------------------------------

def machine(cfg: TrainConfig) -> tuple:
    """torchrun or not, the device, the number format of products: (ddp, rank, world, device, dtype, why)."""
    ddp, rank, world = "RANK" in os.environ, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = build_db.resolve_device(cfg.device)
    if ddp:
        if device.startswith("cuda"):                 # a GPU per process: NCCL cannot share one between two
            if (n := int(os.environ["LOCAL_WORLD_SIZE"])) > torch.cuda.device_count():
                raise DBError(f"torchrun started {n} processes on a machine with {torch.cuda.device_count()} GPU(s): "
                              "pass --nproc_per_node with at most one per GPU, or --device cpu")
            torch.cuda.set_device(device := f"cuda:{os.environ['LOCAL_RANK']}")
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return (ddp, rank, world, device, *build_db.resolve_dtype(cfg.dtype, device))


def build_model(cfg: TrainConfig, db: build_db.Database, device: str) -> tuple:
    """The model and AdamW: new, RETRO-fitted from a baseline (--retrofit), or resumed (--resume); the step."""
    torch.manual_seed(cfg.seed)
    model = RETRO(model_config(cfg, db.meta)).to(device)
    if cfg.retrofit:
        base = load_checkpoint(Path(cfg.retrofit), db.meta, db.path)
        if base["model_config"] != asdict(model.config):
            raise DBError(f"{cfg.retrofit} has another model config: pass the model flags it was trained with")
        model.load_state_dict(base["model"])
        for block in model.blocks:                    # start exactly as the baseline: CCA adds 0 until it learns
            if block.cca is not None:
                torch.nn.init.zeros_(block.cca.attn.proj.weight)
        model.set_trainable(decoder=False)            # RETRO-fitting: only the encoder and CCA learn
    elif cfg.n_neighbours == 0:
        model.set_trainable(retrieval=False)          # the baseline: encoder and CCA stay unused
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           device.split(":")[0])
    if not cfg.resume:
        return model, optimizer, 0
    ckpt = load_checkpoint(ckpt_path := Path(cfg.out_dir) / "ckpt.pt", db.meta, db.path)
    if ckpt["model_config"] != asdict(model.config):
        raise DBError(f"{ckpt_path} was trained with another model config: pass its model flags, or another "
                      "--out_dir")
    model.load_state_dict(ckpt["model"])
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError:                                # other parameters were trained
        tc = ckpt["train_config"]
        raise DBError(f"{ckpt_path} trained other parameters: resume with --retrofit {tc['retrofit']!r} "
                      f"--n_neighbours {tc['n_neighbours']}, as it was trained") from None
    if ckpt["iter"] > cfg.max_iters:
        raise DBError(f"{ckpt_path} is at step {ckpt['iter']}, past --max_iters {cfg.max_iters}: pass a larger "
                      "--max_iters")
    return model, optimizer, ckpt["iter"]


def compile_plan(cfg: TrainConfig, device: str, dtype: torch.dtype, steps: int) -> tuple:
    """--compile -> (what torch.compile compiles: "encoder", "model" or "none", why). auto compiles the neighbour
    encoder under bf16 on a CPU with AMX. It reads 4x the decoder's tokens, and its norms, GELU and casts are
    memory-bound work that AMX's bf16 does not speed up and fusion does: a step 1.2x faster there; in fp32, or with
    AVX-512 BF16 (Zen 4), no faster (bench/RESULTS.md). The first step compiles (30-60 s on 2 cores with a C++
    compiler, cached for later runs), so auto compiles for runs of 200 steps or more."""
    cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")     # what inductor calls
    cpu = device.startswith("cpu")
    if cfg.compile == "auto":
        if not (cpu and dtype == torch.bfloat16 and cfg.n_neighbours and steps >= 200
                and build_db.cpu_computes_bf16() == "AMX"):
            return "none", ""
        if not shutil.which(cxx):
            return "none", f"the encoder not compiled: no C++ compiler ({cxx}; set CXX)"
        return "encoder", "the neighbour encoder compiled in the first step (--compile auto)"
    if cfg.compile != "none" and cpu and not shutil.which(cxx):
        raise DBError(f"--compile {cfg.compile} needs a C++ compiler on a CPU and {cxx} is not found: install one "
                      "(or set CXX), or pass --compile none")
    if cfg.compile != "none" and device.startswith("mps"):
        return "none", f"--compile {cfg.compile} ignored on MPS (inductor does not build for Apple GPUs)"
    return cfg.compile, "" if cfg.compile == "none" else f"--compile {cfg.compile}"


def get_lr(cfg: TrainConfig, it: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak (paper, appendix C.1)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- training: set up, loop, finish -------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    run = setup(cfg)
    history = loop(cfg, run)
    finish(cfg, run, history)
    return history


def setup(cfg: TrainConfig) -> SimpleNamespace:
    """The machine, the database (process 0 builds it if it must), the model, and what wraps it."""
    ddp, rank, world, device, dtype, dtype_why = machine(cfg)
    run = SimpleNamespace(ddp=ddp, rank=rank, master=rank == 0, device=device, ctx=autocast(device, dtype),
                          print0=print if rank == 0 else (lambda *a, **k: None))
    db = prepare_db(cfg) if run.master else None
    if ddp:
        try:
            torch.distributed.barrier()
        except RuntimeError:                          # process 0 failed, and said why
            sys.exit(1)
    run.db = db = db or prepare_db(cfg)
    run.data = Data(db, cfg)
    run.model, run.optimizer, run.start = build_model(cfg, db, device)
    run.raw_model = raw = run.model                   # not wrapped by DDP or compile: what is saved and sampled
    # fp16 (GPUs without fast bf16) needs its loss scaled so that small gradients do not vanish; bf16 and fp32 not
    run.scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    run.compiled, compile_why = compile_plan(cfg, device, dtype, cfg.max_iters - run.start)
    if run.compiled == "model":
        run.model = torch.compile(run.model)
    elif run.compiled == "encoder":
        raw.encoder.compile()                         # in place: the same weights, and the same names in checkpoints
    if run.compiled != "none" and device.startswith("cpu"):
        # compiled, the embedding's gradient is a scatter-add whose threads add in the order they finish: without
        # inductor's deterministic kernels a run would not repeat itself, nor --resume its run (for good here)
        torch.use_deterministic_algorithms(True, warn_only=True)
    if ddp:
        run.model = DDP(run.model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None)
    run.tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.block_size
    trained = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    run.print0(f"RETRO: {raw.num_params() / 1e6:.2f}M parameters, {trained / 1e6:.2f}M trained, K={cfg.n_neighbours}; "
               f"{world} process(es) on {device}, {dtype_why}{compile_why and ', '}{compile_why}; "
               f"{run.tokens_per_step:,} tokens per step")
    if cfg.n_neighbours:              # measured before training: what retrieval can do for this text
        copies = f"; so {run.data.synthetic:.0%} of training chunks read an edited copy of their continuation " \
                 f"(--synthetic {cfg.synthetic})" if run.data.synthetic else ""
        run.print0(f"retrieval outlook: {build_db.outlook(db.meta['overlap'])}{copies}")
    return run


def loop(cfg: TrainConfig, run: SimpleNamespace) -> dict:
    """The training steps: gradient accumulation; process 0 evaluates and saves every eval_interval steps."""
    history = {"loss": {}, "val": {}}               # step -> training loss, step -> evaluation
    run.ckpt_path, run.log_path = Path(cfg.out_dir) / "ckpt.pt", Path(cfg.out_dir) / "log.jsonl"
    if run.master and not cfg.resume:               # log: one JSON line per evaluation
        run.log_path.unlink(missing_ok=True)
    model, optimizer, start = run.model, run.optimizer, run.start
    run.train_time = first = 0.0                    # seconds in training steps (not evaluation); in the first
    for it in range(start, cfg.max_iters):
        if it % cfg.eval_interval == 0 and it > start and run.master:
            with torch.compiler.set_stance("force_eager"):     # what was compiled, for training's shapes only
                r = history["val"][it] = evaluate(run.raw_model, run.data, run.ctx, run.device, cfg.eval_iters)
            run.print0(f"step {it}: val loss {r['on'][0]:.4f} (bpb {r['on'][1]:.4f}), retrieval off {r['off'][0]:.4f}")
            log_eval(run.log_path, it, r, run.tokens_per_step)
            save_checkpoint(run.ckpt_path, run.raw_model, optimizer, cfg, it, run.db.meta)
        t0, lr = time.time(), get_lr(cfg, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(cfg.seed + 1_000_003 * it + run.rank)   # dropout too replays exactly on --resume
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            x, y, nb = (t.to(run.device) if t is not None else None for t in run.data.batch("train", it, micro,
                                                                                              run.rank))
            sync = not run.ddp or micro == cfg.grad_accum - 1      # DDP: all-reduce on the last micro-step only
            with run.ctx, (nullcontext() if sync else model.no_sync()):
                loss = model(x, nb, y)[1] / cfg.grad_accum
                run.scaler.scale(loss).backward()
            step_loss += loss.detach()                         # the mean over micro-steps (rank 0's)
        run.scaler.unscale_(optimizer)                         # the clip sees true gradients
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip)
        run.scaler.step(optimizer)                             # fp16: skipped if a gradient overflowed
        run.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if log := (it + 1) % cfg.log_interval == 0 or it == start:
            history["loss"][it + 1] = step_loss.item()                  # .item() waits for the GPU: time is right
        run.train_time += time.time() - t0
        if it == start:
            first = run.train_time                      # the first step compiles, if anything is compiled
        if log:
            dt = (run.train_time - first) / (it - start) if it > start else 0     # the steps after the first
            rate = (f"{run.tokens_per_step / dt:,.0f} tokens/s, {dt * (cfg.max_iters - it - 1) / 60:.1f} min left"
                    if dt else f"{first:.1f} s (the first step{', compiling' if run.compiled != 'none' else ''})")
            run.print0(f"step {it + 1}/{cfg.max_iters}: loss {history['loss'][it + 1]:.4f}, lr {lr:.2e}, {rate}")
    return history


def finish(cfg: TrainConfig, run: SimpleNamespace, history: dict):
    """The end: a checkpoint, the whole validation set with the oracle check, the report, a sample."""
    if run.master:
        model, data, ctx, device = run.raw_model, run.data, run.ctx, run.device
        with torch.compiler.set_stance("force_eager"):         # evaluation and sampling: no gradients, other shapes
            save_checkpoint(run.ckpt_path, model, run.optimizer, cfg, cfg.max_iters, run.db.meta)
            r = history["val"][cfg.max_iters] = evaluate(model, data, ctx, device, desc="final eval")
            probe = retrieval_probe(model, data, ctx=ctx, device=device) if cfg.n_neighbours else None
            log_eval(run.log_path, cfg.max_iters, r, run.tokens_per_step, final=True, probe=probe)
            print(f"trained {cfg.max_iters - run.start} steps in {run.train_time / 60:.1f} min")
            report(r, probe, run.db.meta)
            sample_held_out(model.eval(), run.db, cfg, device)
    if run.ddp:     # the others wait for process 0's evaluation: a group torn down by one process alone can abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---- the edited-copy recipe (--synthetic): a reason to read, where the database rarely holds one -----------

# --synthetic auto's share of chunks where fewer than half the held-out chunks retrieve what follows them (the
# outlook: the KJV alone 13%, Austen 2%): a model trained there learns to ignore its neighbours, and a database
# grown later is wasted. None where more do (the quick start's 81%): real neighbours teach it to read.
SYNTHETIC_AUTO = 0.5


def add_edited_copies(nb, stream, starts, M: int, share: float, rng, pad: int, eot: int, noise: float = 0.1):
    """--synthetic, in training only: each chunk u of the sequences starting at chunks `starts`, with probability
    share, reads as its last neighbour an edited copy of [C_u, C_{u+1}]: the answer in other words, so that reading
    pays in training too. Edited the way related text differs: the start moved by up to M/4 tokens either way
    (other chunk boundaries), each token dropped with probability noise, else replaced with probability noise by
    one from elsewhere in the stream; nothing after the document's end. nb (B, L, K, 2M), changed in place."""
    for b, s in enumerate(starts):
        for u in np.flatnonzero(rng.random(nb.size(1)) < share):
            a = int(np.clip((s + u) * M + rng.integers(-(M // 4), M // 4 + 1), 0, len(stream) - 1))
            seg = np.asarray(stream[a:a + 4 * M], np.int64)
            seg = seg[rng.random(len(seg)) >= noise]
            swap = rng.random(len(seg)) < noise
            seg[swap] = stream[rng.integers(0, len(stream), int(swap.sum()))]
            seg = seg[:2 * M]
            if (ends := np.flatnonzero(seg == eot)).size:
                seg = seg[:ends[0] + 1]
            nb[b, u, -1] = torch.from_numpy(np.pad(seg, (0, 2 * M - len(seg)), constant_values=pad))


# ---- evaluation ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, data, ctx, device, n_batches=None, desc="eval") -> dict:
    """Held-out loss (nats per token) and bits per byte with the retrieved neighbours (RETRO[ON]) and with them
    withheld, the same weights (RETRO[OFF]; without retrieval, the same as ON), and both per held-out chunk
    ("chunks": the nats and bytes of its tokens, for bpb_by_overlap). Every held-out token is scored once
    (Data.eval_batches), with at least M tokens of context. The paper (section 4.1) scores each document on its
    own in windows of n = 2048 tokens with a stride of 1024, so a document's first chunk reads nothing
    (RET(C_1) = {}); here the windows run across documents, as training's sequences do, with a stride of n - m:
    1.14x the forward passes of disjoint windows, rather than 2x. Bits per byte are the paper's (equation 5);
    <|endoftext|> holds none and is not scored: the paper's documents are scored whole, with no end to predict."""
    model.eval()
    M, T, eot = data.M, data.cfg.block_size, data.meta["eot_id"]
    modes = ("on", "off") if data.cfg.n_neighbours else ("on",)
    chunks = {k: torch.zeros(len(data.tokens["val"]) // M, dtype=torch.float64) for k in (*modes, "tokens", "bytes")}
    for starts in tqdm(data.eval_batches(n_batches), desc=desc, leave=False, disable=None):
        x, y, nb = (t.to(device) if t is not None else None for t in data.sequences("val", starts))
        later = torch.as_tensor(starts, device=device)[:, None] > 0                # (B, 1): not the first window
        y[(y == eot) | later & (torch.arange(T, device=device) < (M if T > M else 0))] = -1   # (B, T)
        scored = (y >= 0).cpu()
        chunk = ((torch.as_tensor(starts)[:, None] * M + torch.arange(1, T + 1)) // M)[scored]  # each target's chunk
        chunks["tokens"].index_add_(0, chunk, torch.ones(len(chunk), dtype=torch.float64))
        chunks["bytes"].index_add_(0, chunk, data.token_bytes[y.cpu()[scored]].double())
        for mode in modes:
            with ctx:
                logits = model(x, nb if mode == "on" else None)[0]
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
            chunks[mode].index_add_(0, chunk, nll.view(y.shape).cpu()[scored].double())
    chunks.setdefault("off", chunks["on"])                                        # without retrieval, OFF is ON
    model.train()
    n_tokens, n_bytes = chunks["tokens"].sum().item(), chunks["bytes"].sum().item()
    r = {m: (chunks[m].sum().item() / n_tokens, chunks[m].sum().item() / math.log(2) / n_bytes) for m in ("on", "off")}
    r["chunks"] = {k: v.numpy() for k, v in chunks.items()}
    return r


@torch.no_grad()
def retrieval_probe(model, data, n_batches=16, ctx=nullcontext(), device="cpu", modes=("none", "oracle")):
    """The oracle check: does the model read its neighbours? Held-out loss (nats) over the positions that can see
    neighbours, with modes of none, the stored ones, shuffled ones (other chunks' neighbours) and the oracle [C_u,
    C_{u+1}] as every neighbour, which holds the answer: a model that copies drops far below none."""
    model.eval()
    M, T, K = data.M, data.cfg.block_size, max(data.cfg.n_neighbours, 1)
    stream, pad = data.tokens["val"], data.meta["pad_id"]
    g = torch.Generator().manual_seed(0)
    total, n = dict.fromkeys(modes, 0.0), 0
    for starts in data.eval_batches(n_batches):
        x, y, nb = data.sequences("val", starts)
        ahead = np.stack([np.pad(stream[s * M:s * M + T + M], (0, max(0, s * M + T + M - len(stream))),
                                 constant_values=pad) for s in starts]).astype(np.int64)
        oracle = torch.from_numpy(ahead).unfold(1, 2 * M, M)[:, :T // M, None].expand(-1, -1, K, -1)  # (B, L, K, R)
        nb = nb if nb is not None else oracle.new_full(oracle.shape, pad)
        shuffled = nb.flatten(0, 1)[torch.randperm(nb.size(0) * nb.size(1), generator=g)].view_as(nb)
        y[y == data.meta["eot_id"]] = -1
        x, y = x.to(device), y[:, M - 1:].to(device)
        for mode, neighbours in ((m, dict(none=None, stored=nb, shuffled=shuffled, oracle=oracle)[m]) for m in total):
            with ctx:
                logits = model(x, None if neighbours is None else neighbours.to(device))[0][:, M - 1:]
            total[mode] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                                           reduction="sum").item()
        n += (y >= 0).sum().item()
    model.train()
    return {mode: v / n for mode, v in total.items()}


def report(r: dict, probe: dict, meta: dict):
    """evaluate's numbers in words, and the oracle check's verdict."""
    (on, off), n = (r["on"][1], r["off"][1]), meta["n_val_documents"]
    tokens = int(r["chunks"]["tokens"].sum())
    print(f"held-out text: {n} document{'s' * (n > 1)} never trained on ({tokens:,} tokens scored, each once)")
    if probe is None:
        print(f"  bits per byte (no retrieval)                                    {on:.4f}")
        return
    print(f"  bits per byte with the retrieved neighbours (RETRO[ON])         {on:.4f}")
    print(f"  bits per byte, neighbours withheld, same weights (RETRO[OFF])   {off:.4f}   ON is {on / off - 1:+.1%}")
    fall = 1 - probe["oracle"] / probe["none"]
    verdict = ("the model reads its neighbours" if fall >= 0.1 else "it reads them a little" if fall >= 0.02
               else "it hardly reads its neighbours")
    print(f"  oracle check: given the true continuation as its neighbour, the loss falls by {fall:.0%}: {verdict}")


def log_eval(path: Path, step: int, r: dict, tokens_per_step: int, final: bool = False, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(dict(step=step, tokens=step * tokens_per_step, final=final, loss_on=r["on"][0],
                                bpb_on=r["on"][1], loss_off=r["off"][0], bpb_off=r["off"][1], **extra)) + "\n")


# ---- the database and checkpoints ----------------------------------------------------------------------------

def db_config(cfg: TrainConfig) -> DBConfig:
    """The database that training with cfg reads, and builds if it is missing."""
    return DBConfig(text=cfg.data, out=cfg.db, chunk_len=cfg.chunk_len, k=max(cfg.n_neighbours, 2), dtype=cfg.dtype,
                    seq_len=cfg.block_size, vocab_size=cfg.vocab_size, retrieval_texts=cfg.retrieval_texts)


def prepare_db(cfg: TrainConfig, training: bool = True) -> build_db.Database:
    """An existing --db as it is (it may hold retrieval-only texts, or have grown); else the database of
    cfg.data, built if missing, rebuilt if the text changed, with the settings it was built with (embedder,
    tokenizer size, retrieval-only texts). Training refuses one built for other shapes."""
    if "://" in cfg.db:
        raise DBError(f"--db {cfg.db}: train.py reads a database folder; a served one: python extras/sample.py "
                      "(or evaluate.py) --db URL")
    want = db_config(cfg)
    db = build_db.db_dir(want)
    if (db / "meta.json").exists():
        c, r = (meta := build_db.load_meta(db))["corpus"], meta["retrieval"]
        if training and (c["chunk_len"] != cfg.chunk_len or r["k"] < cfg.n_neighbours or r["seq_len"] < cfg.block_size):
            raise DBError(f"{db} was built with chunk_len {c['chunk_len']}, k {r['k']}, seq_len {r['seq_len']}; this "
                          f"run needs chunk_len {cfg.chunk_len}, k >= {cfg.n_neighbours}, seq_len >= {cfg.block_size}: "
                          f"run python build_db.py {cfg.data} --out {db} --chunk_len {cfg.chunk_len} "
                          f"--k {max(cfg.n_neighbours, 2)} --seq_len {cfg.block_size}, or pass --db NEW_FOLDER")
        if cfg.db:
            return build_db.open_db(db)
        want.vocab_size, want.bert, want.pooling = c["vocab_size"], c["bert"], c["pooling"]
        want.val_every, want.exclude_own_document = c["val_every"], r.get("exclude_own_document", False)
        want.k, want.seq_len, want.exact_below = r["k"], r["seq_len"], r["exact_below"]
        if cfg.retrieval_texts in ("", "auto"):      # the texts it holds (it may have grown with --add)
            want.retrieval_texts = ",".join(s["text"] for s in meta["sources"]) or "none"
    build_db.build(want)
    return build_db.open_db(db)


def load_checkpoint(path: Path, meta: dict = None, db=None, ckpt: dict = None) -> dict:
    """path's checkpoint (ckpt if it was read already), checked against the database `meta` when given: a model
    can use any database with its tokenizer and chunk length, whatever its text, grown or not."""
    if ckpt is None and not path.exists():
        raise DBError(f"no checkpoint at {path}: train one first with python train.py --out_dir {path.parent}")
    try:
        ckpt = ckpt or torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"model", "model_config", "train_config", "iter", "tokenizer_sha256"} <= \
            ckpt.keys()
    except Exception as e:
        raise DBError(f"{path} is not a checkpoint of train.py ({type(e).__name__}): pass the ckpt.pt of a run, or "
                      "train again") from None
    if meta is None:
        return ckpt
    mc, tc = ckpt["model_config"], ckpt["train_config"]
    if (ckpt["tokenizer_sha256"], mc["chunk_len"], mc["vocab_size"]) != (
            meta["tokenizer_sha256"], meta["corpus"]["chunk_len"], meta["vocab_size"]):
        own = build_db.db_dir(db_config(replace(TrainConfig(), data=tc["data"], db=tc["db"],   # the one it was
                                                retrieval_texts=tc["retrieval_texts"])))      # trained with
        raise DBError(f"{path} was trained with tokenizer {ckpt['tokenizer_sha256'][:8]} and chunk_len "
                      f"{mc['chunk_len']}; {db} has tokenizer {meta['tokenizer_sha256'][:8]} and chunk_len "
                      f"{meta['corpus']['chunk_len']}: pass a database with the model's tokenizer and chunk length "
                      f"(python build_db.py TEXT --tokenizer {own} --chunk_len {mc['chunk_len']}), or train again")
    if (k := meta["retrieval"]["k"]) < tc["n_neighbours"]:
        raise DBError(f"{db} holds {k} neighbours per chunk and the model reads {tc['n_neighbours']}: build it "
                      f"with --k {tc['n_neighbours']}")
    return ckpt


def save_checkpoint(path: Path, raw_model, optimizer, cfg, it, meta):
    """Plain types only (torch.load(weights_only=True) reads it), fp32 weights: it loads on any device."""
    ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
            "model_config": asdict(raw_model.config), "train_config": asdict(cfg), "corpus": meta["corpus"],
            "tokenizer_sha256": meta["tokenizer_sha256"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_db.atomic(path) as tmp:
        torch.save(ckpt, tmp)


# ---- sampling -----------------------------------------------------------------------------------------------

def generate(model, tok, prompt: str, cfg: TrainConfig, device: str, retrieve=None) -> str:
    """max_new_tokens sampled after prompt ("": a new document); retrieve: RETRO.generate's (None: no retrieval)."""
    idx = torch.tensor([tok.encode(prompt).ids or [tok.token_to_id(SEPARATOR)]], device=device)
    torch.manual_seed(cfg.seed)
    out = model.generate(idx, cfg.max_new_tokens, retrieve, cfg.temperature, cfg.top_k or None)
    return tok.decode(out[0].tolist(), skip_special_tokens=False).rstrip("\ufffd")     # no last character cut short


def sample_held_out(model, db: build_db.Database, cfg: TrainConfig, device: str):
    """The end of a run: a sample that starts with a held-out document's first words, and the database chunk
    each completed chunk retrieved (its nearest neighbour, abridged), which the tokens after it read."""
    tok, M, reads = db.tokenizer, cfg.chunk_len, []
    retriever = Retriever(db.path, device) if cfg.n_neighbours else None     # a baseline loads no embedder, no index

    def retrieve(chunk):                    # RETRO.generate's: a completed chunk (1, M) -> (1, K, 2M)
        reads.append((chunk[0].cpu(), retriever.query(chunk.cpu(), k=cfg.n_neighbours)))
        return torch.as_tensor(reads[-1][1]["neighbours"], dtype=torch.long, device=chunk.device)
    text = generate(model, tok, tok.decode(db.tokens["val"][:M // 2].tolist()), cfg, device, retriever and retrieve)
    print(f"sample from a held-out document's first words{', with retrieval' if reads else ''}:\n{text}")

    def abridge(ids) -> str:                                    # one line of at most 60 characters
        text = " ".join(tok.decode([i for i in ids.tolist() if i != db.meta["pad_id"]]).split())
        return text if len(text) <= 60 else text[:57] + "..."
    if reads:
        print(f"what each chunk of {M} tokens retrieved (its nearest neighbour), read by the tokens after it:")
    for u, (chunk, found) in enumerate(reads):
        nb, source = found["neighbours"][0, 0], build_db.source_of(db.meta, int(found["ids"][0, 0]))[0]
        print(f"  chunk {u} {abridge(chunk)!r}\n      read {Path(source or 'nothing').name}: {abridge(nb[:M])!r}"
              f"\n        continued: {abridge(nb[M:])!r}")


def main(argv=None):
    cfg = cli(TrainConfig, "train.py", "Train RETRO on a text file, evaluate it and sample from it.", argv)
    try:
        return train(cfg)
    except DBError as e:                # torchrun: process 0 says it, the others exit 1
        sys.exit(f"train.py: error: {e}" if os.environ.get("RANK", "0") == "0" else 1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:     # checkpoints and databases are written whole (temporary file, then rename)
        sys.exit("train.py: interrupted: nothing half-written is left; --resume continues from the last checkpoint")
    except BrokenPipeError:       # what read the output has gone (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
