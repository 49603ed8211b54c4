"""The executable specification of this RETRO implementation: `pytest test_retro.py`.

Part 1 specifies the model (retro.py). Tiny configs, fixed seeds, eval mode, float64 wherever numbers are
compared. Each test's name is the property it proves.
"""

import ast
import math
import sys

import pytest
import torch

from retro import RETRO, RetroConfig

V = 37  # vocabulary of the tiny models

# (chunk length M, neighbours K, decoder layers, CCA layers, encoder layers that cross-attend to the chunk)
CONFIGS = [
    dict(chunk_len=4, K=2, n_layer=3, cca_layers=(1, 2), enc_cross_layers=(0,)),
    dict(chunk_len=3, K=3, n_layer=2, cca_layers=(0,), enc_cross_layers=(0,)),
    dict(chunk_len=5, K=1, n_layer=3, cca_layers=(0, 2), enc_cross_layers=(0, 1)),
]
IDS = [f"M{c['chunk_len']}-K{c['K']}-cca{''.join(map(str, c['cca_layers']))}" for c in CONFIGS]


def tiny(chunk_len, K, n_layer, cca_layers, enc_cross_layers, seed=0, **kw):
    """A float64 model in eval mode, and its K."""
    torch.manual_seed(seed)
    cfg = RetroConfig(vocab_size=V, block_size=64, chunk_len=chunk_len, n_layer=n_layer, n_head=2, n_embd=16,
                      cca_layers=cca_layers, enc_n_layer=2, enc_n_head=2, enc_n_embd=12,
                      enc_cross_layers=enc_cross_layers, **kw)
    return RETRO(cfg).double().eval(), K


def data(model, K, B=2, T=None, seed=1):
    """Random tokens (B, T), T not a multiple of M, and neighbours (B, T // M, K, 2M) without padding."""
    M = model.config.chunk_len
    T = T or 3 * M + 2
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, V, (B, T), generator=g)
    neighbours = torch.randint(1, V, (B, T // M, K, 2 * M), generator=g)
    return idx, neighbours


def changed(t):
    """Every token replaced by a different one that is not padding (ids 1..V-1, rotated by one)."""
    return t % (V - 1) + 1


@pytest.fixture(params=CONFIGS, ids=IDS)
def setup(request):
    model, K = tiny(**request.param)
    return model, K


# ---- shapes and initialisation ----

def test_shapes_and_initial_loss_is_close_to_uniform(setup):
    model, K = setup
    idx, nb = data(model, K, B=3)
    targets = torch.randint(0, V, idx.shape, generator=torch.Generator().manual_seed(9))
    logits, loss = model(idx, nb, targets=targets)
    assert logits.shape == (3, idx.size(1), V)
    assert abs(loss.item() - math.log(V)) < 0.05, "a fresh model should predict close to uniformly"
    assert model(idx, nb)[1] is None


def test_no_neighbours_and_zero_neighbours_are_the_same_plain_decoder(setup):
    model, K = setup
    idx, nb = data(model, K)
    plain = model(idx)[0]
    assert torch.equal(plain, model(idx, nb[:, :, :0])[0])
    assert not torch.allclose(plain, model(idx, nb)[0]), "neighbours must change something"


# ---- causality: no position sees the future, through self-attention or through retrieval ----

def test_token_causality_at_every_position(setup):
    model, K = setup
    idx, nb = data(model, K)                       # T = 3M + 2: not a multiple of M
    base = model(idx, nb)[0]
    for j in range(idx.size(1)):
        idx2 = idx.clone()
        idx2[:, j] = changed(idx[:, j])
        out = model(idx2, nb)[0]
        assert torch.equal(out[:, :j], base[:, :j]), f"changing token {j} changed an earlier position"
        assert not torch.allclose(out[:, j], base[:, j]), f"token {j} does not reach its own position"


def test_neighbours_of_chunk_u_reach_exactly_the_positions_from_the_chunks_last_token(setup):
    model, K = setup
    M = model.config.chunk_len
    idx, nb = data(model, K)
    base = model(idx, nb)[0]
    for u in range(nb.size(1)):
        nb2 = nb.clone()
        nb2[:, u] = changed(nb[:, u])
        out = model(idx, nb2)[0]
        first = (u + 1) * M - 1                    # the last token of chunk u
        assert torch.equal(out[:, :first], base[:, :first]), f"Ret(C_{u}) leaked before position {first}"
        assert not torch.allclose(out[:, first], base[:, first]), f"Ret(C_{u}) does not reach position {first}"


def test_neighbour_encoder_reads_the_retrieving_chunk_only_causally(setup):
    """The encoder is conditioned on the activations of chunk u; a token of chunk u changes E_u, but E_u is
    read only from the chunk's last token on, so token causality above already covers it. Here: it does
    change E_u (the conditioning is real)."""
    model, K = setup
    M = model.config.chunk_len
    idx, nb = data(model, K)
    idx2 = idx.clone()
    idx2[:, 0] = changed(idx[:, 0])
    # with neighbours the change at position 0 travels through E_0 too; without, only through self-attention
    d_with = (model(idx2, nb)[0] - model(idx, nb)[0])[:, M - 1:2 * M - 1]
    d_without = (model(idx2)[0] - model(idx)[0])[:, M - 1:2 * M - 1]
    assert not torch.allclose(d_with, d_without)


# ---- independence and invariance ----

def test_batch_independence(setup):
    model, K = setup
    idx, nb = data(model, K, B=3)
    base = model(idx, nb)[0]
    idx2, nb2 = idx.clone(), nb.clone()
    idx2[1:], nb2[1:] = changed(idx[1:]), changed(nb[1:])
    assert torch.equal(model(idx2, nb2)[0][0], base[0])
    alone = model(idx[:1], nb[:1])[0]
    assert torch.allclose(alone, base[:1], atol=1e-12, rtol=0)


def test_permuting_a_chunks_neighbours_changes_nothing(setup):
    model, K = setup
    if K == 1:
        pytest.skip("one neighbour has no order")
    idx, nb = data(model, K)
    perm = torch.arange(K).flip(0)
    assert torch.allclose(model(idx, nb[:, :, perm])[0], model(idx, nb)[0], atol=1e-12, rtol=0)


def test_prefix_consistency_on_both_sides_of_chunk_boundaries(setup):
    model, K = setup
    M = model.config.chunk_len
    idx, nb = data(model, K, T=3 * M + 2)
    full = model(idx, nb)[0]
    for t in sorted({1, M - 1, M, M + 1, 2 * M - 1, 2 * M, 2 * M + 1, 3 * M + 2}):
        part = model(idx[:, :t], nb[:, :t // M])[0]
        assert torch.allclose(part, full[:, :t], atol=1e-12, rtol=0), f"prefix of {t} tokens differs"


# ---- padding ----

def test_fully_padded_neighbours_give_finite_outputs_equal_to_no_retrieval(setup):
    model, K = setup
    idx, nb = data(model, K)
    pad = torch.full_like(nb, model.config.pad_id)
    model.train()                                  # dropout is 0: train mode only changes the code path
    logits, loss = model(idx, pad, targets=idx)
    loss.backward()
    assert torch.isfinite(logits).all() and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.allclose(logits, model(idx)[0], atol=1e-12, rtol=0)


def test_a_padded_neighbour_counts_as_absent(setup):
    model, K = setup
    if K == 1:
        pytest.skip("needs two neighbours")
    idx, nb = data(model, K)
    padded = nb.clone()
    padded[:, :, -1] = model.config.pad_id
    assert torch.allclose(model(idx, padded)[0], model(idx, nb[:, :, :-1])[0], atol=1e-12, rtol=0)


# ---- chunked cross-attention: positions, checked against the paper's definition ----

def reference_cca(cca, x, enc, enc_mask):
    """CCA by the definition (section 2.4 and appendix B.1.2), one position at a time: position p >= m-1
    attends to E_u, u = (p+1)//m - 1, with the query at relative position m-1+i (i = (p+1) % m) and every
    neighbour token at its index 0..R-1 within its own neighbour."""
    from retro import apply_rotary, rotary
    B, T, C = x.shape
    M, a = cca.M, cca.attn
    H = a.n_head
    D = C // H
    out = torch.zeros_like(x)
    KR = enc.size(2)
    for p in range(M - 1, T):
        u, i = (p + 1) // M - 1, (p + 1) % M
        q = a.q(x[:, p]).view(B, H, 1, D)
        q = apply_rotary(q, rotary(torch.tensor([M - 1 + i]), D, q.dtype))
        k, v = a.kv(enc[:, u]).view(B, KR, 2, H, D).permute(2, 0, 3, 1, 4)     # (B, H, K*R, D)
        k = apply_rotary(k, rotary(torch.arange(KR) % (2 * M), D, k.dtype))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)                            # (B, H, 1, K*R)
        s = s.masked_fill(~enc_mask[:, u].view(B, 1, 1, KR), float("-inf"))
        y = (s.softmax(-1) @ v).view(B, C)
        out[:, p] = a.proj(y)
    return out


def test_chunked_cross_attention_matches_the_papers_definition(setup):
    model, K = setup
    cca = next(b.cca for b in model.blocks if b.cca is not None)
    M = model.config.chunk_len
    g = torch.Generator().manual_seed(3)
    for T in (M - 1, M, 2 * M - 1, 3 * M + 2):
        L = T // M
        x = torch.randn(2, T, model.config.n_embd, generator=g, dtype=torch.float64)
        enc = torch.randn(2, max(L, 1), K * 2 * M, model.config.enc_n_embd, generator=g, dtype=torch.float64)
        mask = torch.rand(2, max(L, 1), K * 2 * M, generator=g) > 0.2
        mask[..., 0] = True
        assert torch.allclose(cca(x, enc, mask), reference_cca(cca, x, enc, mask), atol=1e-12, rtol=0)


# ---- generation ----

def make_retriever(K, M, seed=5):
    """A deterministic retriever: neighbours are a function of the chunk's tokens. It records its calls."""
    calls = []

    def retrieve(chunk):
        assert chunk.shape[1] == M
        calls.append(chunk.clone())
        g = torch.Generator().manual_seed(seed + int((chunk * torch.arange(1, M + 1)).sum()))
        return torch.randint(1, V, (chunk.size(0), K, 2 * M), generator=g)
    return retrieve, calls


@pytest.mark.parametrize("prompt_len", [1, 4, 7])
def test_cached_generation_equals_full_recompute_and_retrieves_each_completed_chunk_once(setup, prompt_len):
    model, K = setup
    M = model.config.chunk_len
    idx = torch.randint(1, V, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    n_new = 3 * M + 1
    retrieve, calls = make_retriever(K, M)
    out = model.generate(idx, n_new, retrieve, top_k=1)
    assert out.shape == (2, prompt_len + n_new) and torch.equal(out[:, :prompt_len], idx)
    assert len(calls) == out.size(1) // M
    for u, chunk in enumerate(calls):
        assert torch.equal(chunk, out[:, u * M:(u + 1) * M]), f"retrieve call {u} got the wrong chunk"

    # greedy decoding by step-by-step full forwards, the definition
    ref_retrieve, _ = make_retriever(K, M)
    ref = idx
    while ref.size(1) < out.size(1):
        L = ref.size(1) // M
        nb = torch.stack([ref_retrieve(ref[:, u * M:(u + 1) * M]) for u in range(L)], 1) if L else None
        ref = torch.cat((ref, model(ref, nb)[0][:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, ref)
    assert torch.equal(out, model.generate(idx, n_new, make_retriever(K, M)[0], top_k=1, use_cache=False))


@pytest.mark.parametrize("prompt_len", [1, 4, 7])
def test_cached_forward_equals_full_forward_at_every_position(setup, prompt_len):
    """What generate relies on: a prompt, then one token at a time through the cache, gives the hidden states
    of the full forward (self-attention keys, the encoder's H and each chunk's E all come from the cache)."""
    from retro import Cache
    model, K = setup
    M = model.config.chunk_len
    idx, nb = data(model, K, T=3 * M + 2)
    full = model.hidden(idx, nb)
    cache = Cache(idx.size(1))
    steps = [model.hidden(idx[:, :prompt_len], nb[:, :prompt_len // M], cache)]
    for t in range(prompt_len, idx.size(1)):
        steps.append(model.hidden(idx[:, t:t + 1], nb[:, :(t + 1) // M], cache))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-12, rtol=0)


def test_generation_without_retriever_is_the_plain_decoder(setup):
    model, K = setup
    idx = torch.randint(1, V, (1, 3))
    out = model.generate(idx, 9, None, top_k=1)
    ref = idx
    for _ in range(9):
        ref = torch.cat((ref, model(ref)[0][:, -1:].argmax(-1)), 1)
    assert torch.equal(out, ref)


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    model, K = tiny(**CONFIGS[0])
    retrieve, _ = make_retriever(K, 4)
    idx = torch.randint(1, V, (2, 5))
    torch.manual_seed(7)
    a = model.generate(idx, 12, retrieve, temperature=1.5, top_k=3)
    torch.manual_seed(7)
    b = model.generate(idx, 12, retrieve, temperature=1.5, top_k=3)
    assert torch.equal(a, b)
    # every sampled token is among the 3 most likely under the full forward
    logits = model(a[:, :-1], torch.stack([retrieve(a[:, u * 4:(u + 1) * 4]) for u in range((a.size(1) - 1) // 4)], 1))[0]
    top3 = logits.topk(3, -1).indices[:, 4:]                                    # predictions of new tokens
    assert (top3 == a[:, 5:, None]).any(-1).all()


# ---- learning ----

def train_steps(model, batches, steps, lr=3e-3):
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=lr)
    model.train()
    losses = []
    for step in range(steps):
        idx, nb, targets = batches(step)
        loss = model(idx, nb, targets)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("with_neighbours", [False, True])
def test_tiny_model_overfits_one_batch(with_neighbours):
    model, K = tiny(**CONFIGS[0], seed=0)
    model.float()
    idx, nb = data(model, K, B=4, T=16)
    nb = nb if with_neighbours else None
    losses = train_steps(model, lambda s: (idx[:, :-1], None if nb is None else nb[:, :3], idx[:, 1:]), 150, lr=1e-2)
    assert losses[-1] < 0.05 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_model_learns_to_copy_from_neighbour_continuations():
    """Random tokens cannot be predicted, except through retrieval: each chunk's neighbour is [C_u, C_{u+1}],
    so the attending chunk can copy C_{u+1} from the continuation F. Fresh data every step: only a model
    whose CCA lines up F with the tokens it predicts gets the loss of chunks 1.. far below ln(V)."""
    torch.manual_seed(0)
    M, B, T = 4, 16, 16
    cfg = RetroConfig(vocab_size=V, block_size=T, chunk_len=M, n_layer=2, n_head=2, n_embd=32, cca_layers=(1,),
                      enc_n_layer=1, enc_n_head=2, enc_n_embd=32)

    def batch(step, with_neighbours):
        g = torch.Generator().manual_seed(1000 + step)
        seq = torch.randint(1, V, (B, T + M), generator=g)
        idx, targets = seq[:, :T], seq[:, 1:T + 1]
        nb = seq.unfold(1, 2 * M, M)[:, :T // M, None]                          # (B, L, 1, 2M) = [C_u, C_{u+1}]
        return idx, nb if with_neighbours else None, targets

    results = {}
    for with_neighbours in (True, False):
        model = RETRO(cfg)
        train_steps(model, lambda s: batch(s, with_neighbours), 250, lr=3e-3)
        idx, nb, targets = batch(10_000, with_neighbours)
        with torch.no_grad():
            logits = model(idx, nb)[0]
        later = torch.nn.functional.cross_entropy(logits[:, M:].flatten(0, 1), targets[:, M:].flatten())
        results[with_neighbours] = later.item()
    assert results[True] < 0.3 * math.log(V), results
    assert results[False] > 0.9 * math.log(V), results


def test_retrofitting_trains_only_the_encoder_and_cca():
    model, K = tiny(**CONFIGS[0])
    model.freeze_decoder()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("encoder.") or ".cca" in n or ".ln_cca" in n for n in trainable)
    assert "wte.weight" in frozen and "blocks.0.attn.q.weight" in frozen
    idx, nb = data(model, K)
    train_steps(model, lambda s: (idx, nb, idx), 3)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_weight_decay_applies_to_matrices_only():
    model, _ = tiny(**CONFIGS[0])
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


# ---- configuration ----

def test_paper_presets_follow_table_2():
    for name, d, layers, first in [("172M", 896, 12, 6), ("425M", 1536, 12, 6), ("1.5B", 2048, 24, 9), ("7.5B", 4096, 32, 9)]:
        cfg = RetroConfig.paper(name)
        assert (cfg.n_embd, cfg.n_layer, cfg.chunk_len, cfg.enc_n_embd, cfg.enc_n_layer) == (d, layers, 64, 896, 2)
        assert cfg.cca_layers == tuple(range(first - 1, layers, 3))          # 0-based: every 3rd from `first`
        with torch.device("meta"):
            model = RETRO(cfg)
        assert model.num_params() > 0


def test_retro_py_imports_only_torch_and_the_standard_library():
    tree = ast.parse(open("retro.py").read())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    assert modules <= {"torch"} | set(sys.stdlib_module_names), modules


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_autocast_on_cuda_matches_fp32():
    model, K = tiny(**CONFIGS[0])
    model = model.float().cuda()
    idx, nb = data(model, K)
    idx, nb = idx.cuda(), nb.cuda()
    ref = model(idx, nb)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(idx, nb)[0]
    assert torch.allclose(out.float(), ref, atol=0.05)
