r"""
RETRO, the Retrieval-Enhanced Transformer, in one file that needs only PyTorch.

RETRO is a decoder-only language model that, for every chunk of m = 64 tokens it has read, looks up the k
nearest chunks of a large text database (by frozen-BERT embedding) and lets the following tokens attend to
them. A small bidirectional encoder reads each retrieved neighbour (the matching chunk plus its continuation),
conditioned on the chunk that retrieved it, and every third decoder layer adds a *chunked cross-attention*
(CCA) that lets the tokens of chunk u+1 read what chunk u retrieved. The model never sees neighbours of the
chunk it is still writing, so it stays autoregressive.

    Borgeaud et al. 2021, "Improving language models by retrieving from trillions of tokens",
    arXiv 2112.04426: section 2.4 (architecture), Algorithm 1, Listing 1, Table 2, appendix B.

Shape legend, used in every comment:
    B batch, T tokens, C width, H heads, D head dim, M chunk length (paper m), L = T // M complete chunks,
    K neighbours per chunk (paper k), R = 2M tokens per neighbour (the neighbour chunk N and its continuation F)

Paper symbol -> name here:
    H (decoder activations)       -> x              Ret(C_u) = ([N^1, F^1], ..., [N^k, F^k]) -> neighbours[:, u]
    E = Encoder(Ret(C), H)        -> enc            H_u (activations of chunk u at layer min P) -> h
    P (layers with CCA)           -> cca_layers     H_u^+ (the attending chunk of Listing 1)     -> q in CCA
    m, k, r, n                    -> chunk_len, K, R, T

Deviations from the paper (each is explained where it happens):
    1. Rotary positions (Su et al. 2021), not Transformer-XL's relative encodings (section 2.5): in self-attention,
       in the encoder, and in CCA without deviation 6 (a neighbour starts at its chunk's position, as in B.1.2).
    2. A chunk whose neighbours are all padding gets nothing from CCA, as if it had retrieved nothing.
    3. Feed-forward with GELU; decoder input and output embeddings tied (GPT-2).
    4. The encoder's input H is RMS-normalised, as every other attention input is in a pre-norm model.
    Five more make the model learn to read its neighbours in hundreds of steps rather than not at all
    (bench/copy_task.py: random tokens whose continuation is in the neighbours; bench/RESULTS.md):
    5. The encoder reads the decoder's token embedding (the paper's ablations find sharing harmless).
    6. CCA's relative position logits are a learned bias per head and offset (T5), initialised like ALiBi; the
       paper computes them from sinusoids of the offset (appendix B.1.2, Listing 1's relative_positional_encodings).
    7. The final norm's gain starts at sqrt(768 / C): GPT-2's logit scale at any width.
    8. CCA starts as an induction head: the key of neighbour token j is made from token j - 1, and its maps
       start as identities, so a query copies what follows its own token in a neighbour, wherever it is.
    9. Token embeddings enter the residual stream times sqrt(C) (Vaswani et al. 2017, section 3.4).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class RetroConfig:
    vocab_size: int = 4096          # paper: 128k SentencePiece tokens
    block_size: int = 512           # most tokens per training sequence (paper n = 2048)
    chunk_len: int = 64             # paper m = 64
    n_layer: int = 6                # decoder layers (paper: 12 for 172M)
    n_head: int = 4                 # (paper: 16 heads of 64 for 172M)
    n_embd: int = 256               # decoder width d (paper: 896 for 172M)
    cca_layers: tuple = (2, 5)      # 0-based decoder layers with CCA (paper: every 3rd from the 6th, 1-based)
    enc_n_layer: int = 2            # paper: 2
    enc_n_head: int = 4             # (paper d' = 896; heads not stated, 14 of 64 here)
    enc_n_embd: int = 256           # encoder width d' (paper: 896 for every model)
    enc_cross_layers: tuple = (0,)  # encoder layers that cross-attend to the retrieving chunk (paper: the 1st)
    ffw_mult: int = 4               # feed-forward width / model width (paper: 4)
    recompute_ffw: bool = True      # training: recompute the feed-forward's GELU in backward (less memory)
    dropout: float = 0.0            # paper: 0 for pre-training, 0.25 on Wikitext103
    pad_id: int = 0                 # neighbour tokens equal to pad_id are masked out
    share_embedding: bool = True    # the encoder reads the decoder's token embedding (paper: its own; deviation 5)
    cca_position_bias: bool = True  # CCA's position logits: learned (deviation 6; paper: sinusoidal; False: rotary)
    cca_induction: bool = True      # CCA starts as a copy head: keys hold the previous token (deviation 8)
    scale_embedding: bool = True    # token embeddings enter the residual stream times sqrt(C) (deviation 9)

    def __post_init__(self):
        self.cca_layers, self.enc_cross_layers = tuple(self.cca_layers), tuple(self.enc_cross_layers)
        assert min(self.vocab_size, self.chunk_len, self.n_layer) >= 1, "vocab_size, chunk_len, n_layer must be >= 1"
        for w, h in ((self.n_embd, self.n_head), (self.enc_n_embd, self.enc_n_head)):   # rotary rotates pairs
            assert w % h == 0 and w // h % 2 == 0, f"width {w} / heads {h} must be an even head dimension"
        assert all(0 <= p < self.n_layer for p in self.cca_layers), \
            f"cca_layers {self.cca_layers} not in [0, {self.n_layer})"
        assert all(0 <= p < self.enc_n_layer for p in self.enc_cross_layers), "enc_cross_layers out of range"

    @classmethod
    def paper(cls, name: str, **overrides) -> "RetroConfig":
        """The four models of Table 2 (paper n = 2048, m = 64, encoder d' = 896 with 2 layers)."""
        d, n_head, n_layer = {"172M": (896, 14, 12), "425M": (1536, 12, 12),
                              "1.5B": (2048, 16, 24), "7.5B": (4096, 32, 32)}[name]
        first = 6 if n_layer == 12 else 9           # Table 10: P = [6, 9, 12] or [9, 12, ..., n_layer]
        cfg = dict(vocab_size=128_000, block_size=2048, chunk_len=64, n_layer=n_layer, n_head=n_head, n_embd=d,
                   cca_layers=tuple(range(first - 1, n_layer, 3)), enc_n_layer=2, enc_n_head=14, enc_n_embd=896)
        return cls(**{**cfg, **overrides})


# ---- building blocks: normalisation, rotary positions, attention, feed-forward -----------------------------
class RMSNorm(nn.Module):
    r"""RMSNorm (Zhang & Sennrich 2019), the paper's normalisation (section 2.5): x / rms(x) * g."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            # training: same numbers, less memory: x / rms(x) redone in backward (RMSNormLean, a side note at the end)
            return RMSNormLean.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rotary(pos: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(T, D/2) complex rotations exp(i * pos * theta_j) for positions pos (T,); theta_j = base^(-2j / D)."""
    theta = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angle = pos.float()[:, None] * theta                                       # (T, D/2)
    return torch.polar(torch.ones_like(angle), angle)


def apply_rotary(x, rot):
    """Read each pair of dims of x (..., T, D) as a complex number and turn it by its position's angle:
    a dot product of two rotated vectors then depends on the difference of their positions only."""
    xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xc = torch.view_as_complex(xc.reshape(*x.shape[:-1], -1, 2))            # (..., T, D/2) complex
    return torch.view_as_real(xc * rot.to(xc.dtype)).flatten(-2).type_as(x)  # (..., T, D)


def attend(q, k, v, mask=None, is_causal=False, dropout=0.0):
    """Scaled dot-product attention; mask (..., Tq or 1, Tk) is True where a query may look. A query with no key
    (a chunk whose neighbours are all padding) would get NaN: it sees all keys, then gets 0: 'nothing retrieved'."""
    # on a CPU in bf16, the plain kernel beats flash for a few hundred keys (the encoder's R, CCA's K*R)
    plain = q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.size(-2) <= 256
    with sdpa_kernel(SDPBackend.MATH) if plain else nullcontext():
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout)
        bias = mask.dtype != torch.bool                                      # additive scores, -inf = masked
        any_key = (mask > float("-inf") if bias else mask).any(dim=-1, keepdim=True)  # (..., Tq or 1, 1)
        mask = mask.masked_fill(~any_key, 0.0) if bias else mask | ~any_key
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout) * any_key


class Attention(nn.Module):
    """ATTN and CA of section 2.4: multi-head attention with rotary positions. Self-attention when ctx is x;
    cross-attention (queries from x, keys and values from ctx, whose width may differ) otherwise."""

    def __init__(self, dim: int, n_head: int, ctx_dim: int = None, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.q, self.kv = nn.Linear(dim, dim, bias=False), nn.Linear(ctx_dim or dim, 2 * dim, bias=False)
        self.proj, self.drop = nn.Linear(dim, dim, bias=False), nn.Dropout(dropout)

    @property
    def p_drop(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(self, x, ctx, q_pos, k_pos, mask=None, is_causal=False, cache=None):
        k, v = self.keys_values(ctx, k_pos)
        if cache is not None:
            k, v = cache(k, v)                              # (B, H, start + S, D): all keys so far
        return self.out(attend(self.queries(x, q_pos), k, v, mask, is_causal, self.p_drop))

    def queries(self, x, pos):
        """pos: the positions to rotate by, or None for no rotary (CCA with its own position bias)."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        return q if pos is None else apply_rotary(q, rotary(pos, q.size(-1)))

    def keys_values(self, ctx, pos):
        *lead, S, _ = ctx.shape
        D = self.q.out_features // self.n_head
        # two products with the halves of one weight rather than one product split in two: a v that is a view of
        # a (.., S, 2C) output would keep k's half alive too, for backward
        k, v = (F.linear(ctx, w).view(*lead, S, self.n_head, D).transpose(-2, -3)
                for w in self.kv.weight.chunk(2))                                # 2 x (..., H, S, D)
        return (k if pos is None else apply_rotary(k, rotary(pos, D))), v

    def out(self, y):
        B, H, T, D = y.shape
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, H * D)))    # (B, T, C)


class FeedForward(nn.Module):
    """FFW: the position-wise two-layer MLP of every transformer block (GELU; deviation 3)."""

    def __init__(self, dim: int, mult: int, dropout: float, recompute: bool = False):
        super().__init__()
        self.fc, self.proj = nn.Linear(dim, mult * dim, bias=False), nn.Linear(mult * dim, dim, bias=False)
        self.drop, self.recompute = nn.Dropout(dropout), recompute

    def forward(self, x):
        if self.recompute and self.training and torch.is_grad_enabled():
            # training: same numbers, less memory: the GELU redone in backward (GeluMLP, a side note at the end)
            return self.drop(GeluMLP.apply(x, self.fc.weight, self.proj.weight))
        return self.drop(self.proj(F.gelu(self.fc(x))))


# ---- the neighbour encoder --------------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    """One layer of the retrieval encoder: bidirectional self-attention over one neighbour's R tokens,
    optional cross-attention to the retrieving chunk's activations H_u (CA_enc in Algorithm 1), FFW."""

    def __init__(self, cfg: RetroConfig, cross: bool):
        super().__init__()
        C = cfg.enc_n_embd
        self.ln_attn, self.attn = RMSNorm(C), Attention(C, cfg.enc_n_head, dropout=cfg.dropout)
        self.ln_cross = RMSNorm(C) if cross else None
        self.cross = Attention(C, cfg.enc_n_head, ctx_dim=cfg.n_embd, dropout=cfg.dropout) if cross else None
        self.ln_ffw, self.ffw = RMSNorm(C), FeedForward(C, cfg.ffw_mult, cfg.dropout, cfg.recompute_ffw)


class NeighbourEncoder(nn.Module):
    """Encoder(Ret(C_u)^j, H_u) of section 2.4 ("Encoding retrieval neighbours"): a small bidirectional transformer
    encodes each neighbour [N, F] of each chunk C_u on its own, conditioned on C_u's activations H_u, into E_u^j."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.cfg = cfg
        # deviation 5: the decoder's embedding (RETRO passes it in), so a neighbour token reaches CCA's values
        # as the very vector the tied output layer scores; mapped to the encoder's width if it differs
        self.wte = None if cfg.share_embedding else nn.Embedding(cfg.vocab_size, cfg.enc_n_embd)
        self.emb_scale = math.sqrt(cfg.enc_n_embd) if cfg.scale_embedding else 1.0
        self.emb_in = (nn.Linear(cfg.n_embd, cfg.enc_n_embd, bias=False)
                       if cfg.share_embedding and cfg.n_embd != cfg.enc_n_embd else nn.Identity())
        self.ln_h = RMSNorm(cfg.n_embd)                           # deviation 4
        self.layers = nn.ModuleList(EncoderLayer(cfg, i in cfg.enc_cross_layers) for i in range(cfg.enc_n_layer))
        self.ln_f = RMSNorm(cfg.enc_n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, neighbours, h, wte=None):
        """neighbours (B, L, K, R) token ids, h (B, L, M, C), wte the decoder's embedding function (deviation 5)
        -> E (B, L, K*R, C_enc) and its mask (B, L, K*R)."""
        (B, L, K, R), (M, C) = neighbours.shape, h.shape[2:]
        mask = neighbours != self.cfg.pad_id                                    # (B, L, K, R)
        emb = self.emb_in(wte(neighbours)) if self.wte is None else self.wte(neighbours) * self.emb_scale
        x = self.drop(emb).to(h.dtype).view(B * L * K, R, -1)     # (B*L*K, R, C_enc); fp32 residuals under autocast
        h = self.ln_h(h).view(B * L, M, C)                                      # (B*L, M, C)
        pos = torch.arange(R, device=x.device)
        for layer in self.layers:
            y = layer.ln_attn(x)
            x = x + layer.attn(y, y, pos, pos, mask=mask.view(B * L * K, 1, 1, R))
            if layer.cross is not None:
                # The K neighbours of chunk u all read the same M activations, so they share one batch row:
                # K*R queries (each at its index in its own neighbour) against chunk u's M keys.
                y = layer.ln_cross(x).view(B * L, K * R, -1)                    # (B*L, K*R, C_enc)
                x = x + layer.cross(y, h, pos.repeat(K), torch.arange(M, device=x.device)).view(B * L * K, R, -1)
            x = x + layer.ffw(layer.ln_ffw(x))
        return self.ln_f(x).view(B, L, K * R, -1), mask.view(B, L, K * R)


# ---- chunked cross-attention ------------------------------------------------------------------------------
class ChunkedCrossAttention(nn.Module):
    r"""CCA(H, E) of section 2.4 and Listing 1 (appendix B.1.3).

    Why the shift by m - 1: the neighbours E_u of chunk C_u were retrieved with the text of C_u, so only positions
    that have read all of C_u may see them, the first being C_u's last token, at u*m + m - 1. Listing 1 therefore
    drops the first m - 1 positions and regroups the rest in chunks of m: the attending chunk H_u^+, the last token
    of C_u and the first m - 1 tokens of C_{u+1}, attends to E_u. Each of its tokens still predicts a token of
    C_{u+1} (or the first of C_{u+2}), so causality holds. The first m - 1 positions see no neighbours (CCA adds 0
    there), and each chunk reads its K neighbours jointly: one softmax over all K*R keys.

    Positions (appendix B.1.2): neighbour tokens sit at 0..R-1 and the query at slot i of H_u^+ at m - 1 + i, as if
    [N, F] lay over [C_u, C_{u+1}]: each query stands over its own token, and F's token i, in line with the token
    the query predicts, is one position ahead. Neighbours share these positions, so their order does not matter. The
    paper turns the offsets into logits through sinusoids; here a learned bias (deviation 6) or rotary (1).
    """

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.M, self.induction = cfg.chunk_len, cfg.cca_induction
        self.attn = Attention(cfg.n_embd, cfg.n_head, ctx_dim=cfg.enc_n_embd, dropout=cfg.dropout)
        # deviation 6: a learned score bias per head and offset key - query (-(2m-2)..m), as in T5, in place of the
        # paper's sinusoidal logits; not rotary, which would turn deviation 8's content match with the offset. It
        # starts as -slope * distance from the token in line (offset +1), slopes 1, 1/4, ... (ALiBi, Press et al.
        # 2021): the first heads read that token from step one, not hundreds of steps later (bench/copy_task.py).
        M, slopes = cfg.chunk_len, 4.0 ** -torch.arange(cfg.n_head, dtype=torch.float32)
        offset = torch.arange(3 * M - 1) - (2 * M - 2)                          # key position - query position
        self.bias = (nn.Parameter(-slopes[:, None] * (offset - 1).abs()[None, :])  # (H, 3M - 1)
                     if cfg.cca_position_bias else None)

    def forward(self, x, enc, enc_mask, kv_cache: dict = None):
        """Listing 1. x (B, T, C) at positions 0..T-1; enc (B, L, K*R, C_enc) and enc_mask (B, L, K*R) for the
        L = T // M complete chunks. kv_cache only when generating (the prompt)."""
        B, T, C = x.shape
        M, H = self.M, self.attn.n_head
        if T < M:                                       # no chunk is complete: nothing to read yet
            return torch.zeros_like(x)
        L = T // M                                      # attending chunks: the last token of chunk u .. M-1 later
        slots = torch.arange(M, device=x.device)
        rope = None if self.bias is not None else M - 1 + slots.repeat(L)[:T - M + 1]
        q = self.attn.queries(x[:, M - 1:], rope)                               # (B, H, T-M+1, D)
        q = F.pad(q, (0, 0, 0, L * M - (T - M + 1)))                            # (B, H, L*M, D)
        q = q.view(B, H, L, M, -1).transpose(1, 2).flatten(0, 1)                # (B*L, H, M, D)
        k, v = (t[:, :L].flatten(0, 1) for t in self.keys_values(enc, kv_cache))  # (B*L, H, K*R, D)
        mask = self.mask(enc_mask[:, :L].reshape(B * L, -1), slots, q.dtype)   # (B*L, H or 1, M, K*R)
        y = attend(q, k, v, mask, dropout=self.attn.p_drop)                     # (B*L, H, M, D)
        y = y.view(B, L, H, M, -1).transpose(1, 2).flatten(2, 3)[:, :, :T - M + 1]  # (B, H, T-M+1, D)
        return F.pad(self.attn.out(y), (0, 0, M - 1, 0))                        # (B, T, C)

    def step(self, x, enc, enc_mask, pos: int, kv_cache: dict):
        """Generating: the one token x (B, 1, C) at position pos reads the neighbours of the last chunk that
        completed at or before it, with their keys and values projected once, when that chunk completed."""
        M = self.M
        if pos < M - 1:
            return torch.zeros_like(x)
        u, slot = (pos + 1) // M - 1, torch.tensor([(pos + 1) % M], device=x.device)
        q = self.attn.queries(x, None if self.bias is not None else M - 1 + slot)   # (B, H, 1, D)
        k, v = (t[:, u] for t in self.keys_values(enc, kv_cache))               # (B, H, K*R, D)
        y = attend(q, k, v, self.mask(enc_mask[:, u], slot, q.dtype), dropout=self.attn.p_drop)
        return self.attn.out(y)                                                 # (B, 1, C)

    def mask(self, enc_mask, slots, dtype):
        """enc_mask (N, K*R), True for real neighbour tokens -> a boolean mask (N, 1, 1, K*R), or with deviation 6
        additive scores (N, H, slots, K*R): neighbour token r is at offset r - (m - 1 + i) from slot i's query."""
        mask, M = enc_mask[:, None, None, :], self.M                            # (N, 1, 1, K*R)
        if self.bias is None:
            return mask
        r = torch.arange(2 * M, device=slots.device)
        bias = self.bias[:, r[None, :] - slots[:, None] + M - 1]                # (H, slots, R)
        bias = bias.repeat(1, 1, enc_mask.size(-1) // (2 * M))                  # (H, slots, K*R)
        return torch.where(mask, bias.to(dtype), float("-inf"))                 # (N, H, slots, K*R)

    def keys_values(self, enc, cache: dict = None):
        """Keys and values (B, L, H, K*R, D) of every chunk's neighbours; generating, each chunk's are projected
        once, when it completes, and kept in cache."""
        done = cache["k"].size(1) if cache else 0
        if cache and done >= enc.size(1):
            return cache["k"], cache["v"]
        k, v = self.attn.keys_values(enc[:, done:] if done else enc, None)      # (B, Lc, H, K*R, D): Lc new chunks
        if self.induction:
            # deviation 8: key j is made from neighbour token j - 1 (zero for j = 0), value j from token j: a query
            # holding token t finds, by content, where a neighbour has a t and reads what follows it there, an
            # induction head (Olsson et al. 2022) with its previous-token half wired in. Real neighbours are rarely in
            # line with their chunk (paraphrases, other boundaries): reading by position would copy the wrong token.
            B, Lc, H, S, D = k.shape
            k = k.view(B, Lc, H, S // (2 * self.M), 2 * self.M, D)                # (B, Lc, H, K, R, D)
            k = F.pad(k[..., :-1, :], (0, 0, 1, 0)).view(B, Lc, H, S, D)        # key j <- token j - 1
        if self.bias is None:                                                   # rotary: 0..R-1 in every neighbour
            k = apply_rotary(k, rotary(torch.arange(k.size(-2), device=k.device) % (2 * self.M), k.size(-1)))
        if done:
            k, v = torch.cat((cache["k"], k), 1), torch.cat((cache["v"], v), 1)
        if cache is not None:
            cache.update(k=k, v=v)
        return k, v


# ---- the decoder ------------------------------------------------------------------------------------------
class Block(nn.Module):
    """A decoder layer. Without CCA: ATTN -> FFW. A RETRO block (layer p in P): ATTN -> CCA -> FFW
    (equation 2). Pre-norm residuals; RETRO.hidden calls the three parts, as Algorithm 1 does."""

    def __init__(self, cfg: RetroConfig, cca: bool):
        super().__init__()
        C = cfg.n_embd
        self.ln_attn, self.attn = RMSNorm(C), Attention(C, cfg.n_head, dropout=cfg.dropout)
        self.ln_cca, self.cca = (RMSNorm(C), ChunkedCrossAttention(cfg)) if cca else (None, None)
        self.ln_ffw, self.ffw = RMSNorm(C), FeedForward(C, cfg.ffw_mult, cfg.dropout, cfg.recompute_ffw)


class RETRO(nn.Module):
    """The Retrieval-Enhanced Transformer (section 2.4, Algorithm 1). neighbours=None (or K = 0) makes it the
    plain decoder it is built on, which is the no-retrieval baseline."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i in cfg.cca_layers) for i in range(cfg.n_layer))
        self.encoder = NeighbourEncoder(cfg)
        self.ln_f = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight                   # tied (deviation 3)
        # deviation 9: so that at init the token itself, not the random residual branches, dominates the early
        # layers, in the decoder and in the encoder: what deviation 8's content match compares
        self.emb_scale = math.sqrt(cfg.n_embd) if cfg.scale_embedding else 1.0
        self.init_weights()

    def init_weights(self):
        """GPT-2's initialisation (normal 0.02, residual branches' outputs scaled down with depth), then the two
        deviations that are initialisations: the final norm's gain (7) and CCA as an induction head (8)."""
        cfg = self.config
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        # deviation 7: the tied output layer scores token t by wte[t] . ln_f(x): with embeddings of std 0.02 the
        # logits can reach 0.02 C, 15 for GPT-2 (C = 768) but 5 at C = 256, too little to single out one token of
        # 4,096 (a copy) until the embeddings grow. A gain of sqrt(768 / C) gives GPT-2's scale at every width.
        nn.init.constant_(self.ln_f.weight, max(1.0, math.sqrt(768 / cfg.n_embd)))
        for block in self.blocks:
            if block.cca is not None and cfg.cca_induction:
                # deviation 8: start CCA as the copy it is for: q = k = identity, so a query matches the keys that
                # hold its own token (the one before the token to copy); v = identity and the output at one
                # embedding's scale (std 0.02): it adds the copied token's embedding, which the tied output layer
                # scores highest. Exact with equal widths (train.py); partial otherwise.
                attn, C = block.cca.attn, cfg.n_embd
                with torch.no_grad():
                    for w in (attn.q.weight, attn.kv.weight[:C], attn.kv.weight[C:], attn.proj.weight):
                        nn.init.eye_(w)
                    attn.proj.weight.mul_(0.02)
        if isinstance(self.encoder.emb_in, nn.Linear):     # a random projection that keeps the embeddings' norm
            nn.init.normal_(self.encoder.emb_in.weight, std=1 / math.sqrt(cfg.n_embd))

    def embed(self, idx):
        """Token embeddings as they enter the residual stream, multiplied by sqrt(C) (deviation 9)."""
        return self.wte(idx) * self.emb_scale

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, neighbours=None, targets=None, return_logits: bool = None):
        """idx (B, T) token ids; neighbours (B, T // M, K, R) or None; targets (B, T), -1 = ignore. Returns (logits
        (B, T, V), None) without targets; with them (None, the mean cross-entropy), a block of rows at a time so the
        logits never exist (ChunkedCrossEntropy); return_logits=True gets both, the plain, memory-hungry way."""
        assert targets is None or targets.shape == idx.shape, \
            f"targets {tuple(targets.shape)} must have idx's shape {tuple(idx.shape)}"
        x = self.hidden(idx, neighbours)                                        # (B, T, C)
        if targets is not None and not return_logits:
            return None, ChunkedCrossEntropy.apply(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        logits, loss = self.lm_head(x), None                                    # (B, T, V)
        if targets is not None:
            acc, t = torch.promote_types(logits.dtype, torch.float32), targets.flatten().long()
            loss = F.cross_entropy(logits.flatten(0, 1).to(acc), t, ignore_index=-1, reduction="sum") / (
                t != -1).sum().clamp(min=1)                             # as ChunkedCrossEntropy: 0 if all ignored
        return logits, loss

    def hidden(self, idx, neighbours=None, cache: "Cache" = None):
        """Algorithm 1 up to READ: the final hidden states (B, T, C). With a cache, idx holds the tokens at
        positions cache.pos.. and neighbours those of every chunk completed so far."""
        cfg, M = self.config, self.config.chunk_len
        assert idx.dim() == 2 and idx.numel() > 0, f"idx {tuple(idx.shape)}: expected (B, T) token ids, B, T > 0"
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        L = (start + T) // M                                    # complete chunks so far
        assert cache is None or (start == 0 or T == 1) and start + T <= cache.max_len, \
            f"with a cache of {cache.max_len} positions, feed the prompt once, then one token at a time"
        retrieval = neighbours is not None and neighbours.size(2) > 0 and len(cfg.cca_layers) > 0
        if neighbours is not None:
            assert neighbours.dim() == 4 and neighbours.shape[:2] == (B, L) and neighbours.size(3) == 2 * M, \
                f"neighbours {tuple(neighbours.shape)}: expected (B={B}, L={L}, K, R={2 * M}) for {start + T} tokens"
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.embed(idx))                                          # (B, T, C)
        enc = enc_mask = None
        for p, block in enumerate(self.blocks):
            # H <- ATTN(H): causal self-attention
            y = block.ln_attn(x)
            x = x + block.attn(y, y, pos, pos, is_causal=T > 1, cache=cache.layer(p) if cache else None)
            if cfg.cca_layers and p == min(cfg.cca_layers):
                # E = Encoder(Ret(C), H): encode once, at the first CCA layer, conditioned on its H
                enc, enc_mask = self.encode(neighbours if retrieval else None, x, start, cache)
            if block.cca is not None and retrieval:
                # H <- CCA(H, E): chunk u+1 reads chunk u's neighbours
                kv_cache = cache.cca.setdefault(p, {}) if cache else None
                y = block.ln_cca(x)
                x = x + (block.cca(y, enc, enc_mask, kv_cache) if start == 0 else
                         block.cca.step(y, enc, enc_mask, start, kv_cache))
            # H <- FFW(H)
            x = x + block.ffw(block.ln_ffw(x))
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)

    def encode(self, neighbours, x, start, cache):
        """E for every complete chunk. Generating, only chunks completed since the last call are encoded,
        each once; the first CCA layer's input is kept in the cache so a chunk's H is complete when needed."""
        (B, T, C), M = x.shape, self.config.chunk_len
        if cache is not None:
            if cache.h is None:
                cache.h = x.new_zeros(B, cache.max_len, C)
            cache.h[:, start:start + T] = x
            x = cache.h[:, :start + T]                          # (B, start + T, C)
        if neighbours is None:
            return None, None
        enc, mask = (None, None) if cache is None else (cache.enc, cache.enc_mask)
        done, L = 0 if enc is None else enc.size(1), x.size(1) // M
        if L > done:
            h = x[:, done * M:L * M].reshape(B, L - done, M, C)                 # (B, L - done, M, C)
            new, new_mask = self.encoder(neighbours[:, done:L], h, self.embed)  # (B, L - done, K*R, C_enc)
            enc = new if enc is None else torch.cat((enc, new), 1)              # (B, L, K*R, C_enc)
            mask = new_mask if mask is None else torch.cat((mask, new_mask), 1)
        if cache is not None:
            cache.enc, cache.enc_mask = enc, mask
        return enc, mask

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, retrieve=None, temperature: float = 1.0, top_k: int = None,
                 use_cache: bool = True):
        """Sample max_new_tokens tokens after idx (B, T). retrieve(chunk (B, M)) -> (B, K, R) is called once for every
        chunk that completes, in the prompt or the output (section 2.4, "Sampling"). top_k=1 or temperature=0: greedy.
        use_cache=False recomputes everything per token, as other RETRO codes do, to check and time the cache."""
        (B, T0), M = idx.shape, self.config.chunk_len
        assert max_new_tokens >= 0 and temperature >= 0 and (top_k is None or top_k >= 1), \
            f"max_new_tokens {max_new_tokens}, temperature {temperature} must be >= 0; top_k {top_k} >= 1 or None"

        def neighbours_of(u):                                                   # (B, 1, K, R)
            nb = retrieve(idx[:, u * M:(u + 1) * M])
            assert torch.is_tensor(nb) and nb.dim() == 3 and nb.size(0) == B and nb.size(2) == 2 * M, \
                f"retrieve returned {getattr(nb, 'shape', type(nb))}, expected a tensor (B={B}, K, R={2 * M})"
            return nb.unsqueeze(1)
        found = [neighbours_of(u) for u in range(T0 // M)] if retrieve else []
        neighbours = torch.cat(found, 1) if found else None                     # (B, L, K, R)
        cache = Cache(T0 + max_new_tokens) if use_cache else None
        # one token's logits read the whole (V, C) output matrix: laid out as (C, V), that read is a stream
        # of rows, which on a CPU runs about twice as fast as F.linear's (memory-bound) matrix-vector product
        head = self.lm_head.weight.t().contiguous()                            # (C, V)
        for _ in range(max_new_tokens):
            logits = (self.hidden(idx[:, cache.pos:], neighbours, cache)[:, -1] @ head if use_cache  # (B, V)
                      else self(idx, neighbours)[0][:, -1])                     # no cache: all of idx, again
            if top_k == 1 or temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)                            # (B, 1)
            else:
                logits = logits.float()
                logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # max first: a tiny T gives 0, -inf
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)           # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)                                   # (B, T + 1)
            if retrieve and idx.size(1) % M == 0:
                nb = neighbours_of(idx.size(1) // M - 1)
                neighbours = nb if neighbours is None else torch.cat((neighbours, nb), 1)
        return idx

    def set_trainable(self, decoder: bool = True, retrieval: bool = True):
        """Choose what learns. The baseline (retrieval=False) leaves the neighbour encoder and CCA unused;
        RETRO-fitting (decoder=False, section 4.2) trains only them (with their norms), the decoder frozen."""
        for name, p in self.named_parameters():
            is_retrieval = name.startswith("encoder.") or ".cca." in name or ".ln_cca." in name
            p.requires_grad = retrieval if is_retrieval else decoder

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), device_type="cpu"):
        """AdamW with weight decay on every 2-D parameter (paper: 0.1, appendix C.1): the matrices, the embedding and
        CCA's position-bias table; norms' gains are not decayed."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


class Cache:
    """What generation keeps so that a new token costs one position of work: self-attention's keys and values,
    the first CCA layer's input (the encoder's H), E for every chunk so far, and each CCA layer's keys and values."""

    def __init__(self, max_len: int):
        self.max_len, self.pos = max_len, 0
        self.kv = {}                    # layer -> (k, v), each (B, H, max_len, D)
        self.h = None                   # (B, max_len, C)
        self.enc = self.enc_mask = None  # (B, chunks encoded, K*R, C_enc), (B, chunks encoded, K*R)
        self.cca = {}                   # layer -> {"k": ..., "v": ...}, each (B, chunks, H, K*R, D)

    def layer(self, i: int):
        def append(k, v):
            B, H, T, D = k.shape
            if i not in self.kv:
                self.kv[i] = (k.new_zeros(B, H, self.max_len, D), v.new_zeros(B, H, self.max_len, D))
            ck, cv = self.kv[i]
            ck[:, :, self.pos:self.pos + T], cv[:, :, self.pos:self.pos + T] = k, v
            return ck[:, :, :self.pos + T], cv[:, :, :self.pos + T]
        return append


# ---- side notes: the same numbers, less memory ----------------------------------------------------------
# Three autograd functions that compute exactly what plain PyTorch would (the tests compare them), but keep
# less for backward. They matter at training sizes on a CPU or a small GPU; a reader of the model can skip them.

class RMSNormLean(torch.autograd.Function):
    """RMSNorm that keeps only x and 1/rms for backward and recomputes x / rms(x) there (one product), where
    autograd would also keep that normalised copy of x: one activation of width C less per norm, 2 or 3 a layer."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        acc = torch.promote_types(x.dtype, torch.float32)                      # fp32 sums (fp64 in tests)
        rstd = torch.rsqrt(x.to(acc).pow(2).mean(-1, keepdim=True) + eps)     # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd                                          # recomputed: (..., C)
        dxhat = dy.to(rstd.dtype) * weight
        dw = (dy.to(rstd.dtype) * xhat).flatten(0, -2).sum(0)
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw.to(weight.dtype), None


class GeluMLP(torch.autograd.Function):
    """gelu(x @ w1.T) @ w2.T that keeps x and the hidden layer h for backward, and recomputes gelu(h) there
    instead of storing it: one of the two 4x wider activations autograd would keep, for an elementwise op."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, w1, w2):
        h = x @ w1.t()                                                          # (..., 4C)
        ctx.save_for_backward(x, w1, w2, h)
        return F.gelu(h) @ w2.t()                                               # (..., C)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, w1, w2, h = ctx.saved_tensors
        dh = torch.ops.aten.gelu_backward(dy @ w2.to(dy.dtype), h)              # (..., 4C)
        dw2 = dy.flatten(0, -2).t() @ F.gelu(h).flatten(0, -2)                  # (C, 4C)
        dw1 = dh.flatten(0, -2).t() @ x.flatten(0, -2).to(dh.dtype)            # (4C, C)
        return dh @ w1.to(dh.dtype), dw1, dw2


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T without ever holding all of them (a vocabulary of 30k and
    8 x 512 tokens: 500 MB of logits, of which autograd keeps three). Rows go in chunks; as d loss / d logits =
    (softmax - onehot) / n, each chunk's gradients are computed at once and backward only scales them."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows: int = 256):
        # x (N, C), weight (V, C), targets (N,) with -1 = ignore
        acc = torch.promote_types(weight.dtype, torch.float32)     # fp32 sums, or fp64 when testing in fp64
        n = (targets != -1).sum().clamp(min=1)
        need_grad = any(ctx.needs_input_grad[:2])
        grad_x, grad_w = (torch.empty_like(x), torch.zeros_like(weight, dtype=acc)) if need_grad else (None, None)
        loss = torch.zeros((), dtype=acc, device=x.device)
        for i in range(0, x.size(0), rows):
            xi, ti = x[i:i + rows], targets[i:i + rows]
            valid = ti != -1
            t = ti.masked_fill(~valid, 0).unsqueeze(1)                         # another negative id: an error
            logits = (xi @ weight.t()).to(acc)                                  # (rows, V)
            target_logit = logits.gather(1, t)                                  # (rows, 1)
            top = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(top).exp_()                                         # in place: one big buffer
            total = e.sum(dim=-1, keepdim=True)
            loss += ((top + total.log() - target_logit).squeeze(1) * valid).sum()
            if need_grad:
                w = (valid.to(acc) / n).unsqueeze(1)                            # 1/n, or 0 where ignored
                g = e.mul_(w / total).scatter_add_(1, t, -w)                    # (softmax - onehot) / n
                grad_x[i:i + rows] = g.to(weight.dtype) @ weight
                if torch.is_autocast_enabled(x.device.type):   # addmm_ is not autocast: it would run in fp32
                    grad_w += g.t() @ xi                                        # (V, C), in autocast's dtype
                else:                                                           # in place: no (V, C) temporary
                    grad_w.addmm_(g.t(), xi.to(acc))
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, (grad_w * grad_loss).to(ctx.weight_dtype), None, None
