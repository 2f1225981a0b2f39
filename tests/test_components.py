"""Behaviour of every component: properties a correct Kunlun component or baseline block has and a broken one lacks.

The formula tests recompute a block from its own weights in plain tensor code (loops or explicit products); the
property tests (padding, batch independence, window, personalisation, CompSkip, streams, candidate) perturb an
input and check what may and what may not change. Small models on rows of the embedded MovieLens latest-small,
in eval mode (so dropout and batch statistics do not enter), float64 where a comparison is exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from kunlun import ops
from kunlun.blocks.attention import SequenceSelfAttention
from kunlun.blocks.embeddings import FeatureInfo, time_positions
from kunlun.blocks.interaction import CrossNetV2, TargetAttention
from kunlun.blocks.pffn import GDPAPFFN
from kunlun.blocks.summary import HierarchicalSeedPooling, SeedPooling
from kunlun.config import model_from_dict
from kunlun.data.batches import Batch, Batcher, SequenceBatch
from kunlun.data.registry import prepare_dataset
from kunlun.models import MODELS, build_model
from kunlun.ops.activations import ACTIVATIONS

MAX_LEN = 40  # long enough that many rows are padded and an event can lie outside the default window (16)
SMALL = {
    "kunlun": {"d_model": 16, "num_seeds": 4, "seq_summary_tokens": 2, "summary_tokens": 2, "fm_hidden": 16, "output_hidden": [16]},
    "interformer": {"d_model": 16, "output_hidden": [16]},
    "bst": {"d_model": 16, "hidden": [32]},
    "din": {"d_model": 16, "hidden": [32, 16]},
    "dnn": {"d_model": 8, "hidden": [32]},
    "dcnv2": {"d_model": 8, "hidden": [32]},
    "wukong": {"d_model": 8, "hidden": [32], "fm_hidden": 32},
    "logistic_regression": {},
}


@pytest.fixture(scope="module")
def ml():
    p = prepare_dataset("ml-latest-small")
    info = FeatureInfo.from_encoder(p.encoder(), MAX_LEN)
    batcher = Batcher(p, "valid", MAX_LEN, event_windows=True)
    lengths = batcher.batch(np.arange(len(batcher))).seqs["history"].mask.sum(1).numpy()
    short, full = np.flatnonzero(lengths < MAX_LEN), np.flatnonzero(lengths == MAX_LEN)
    # 24 rows: padded histories of several lengths and full ones (events more than a window away from the newest)
    pick = np.concatenate([short[np.linspace(0, len(short) - 1, 12).astype(int)], full[np.linspace(0, len(full) - 1, 12).astype(int)]])
    batch = batcher.batch(pick)
    batch.num = batch.num.double()  # the models run in float64
    batch = replace_seq(batch, lambda q: SequenceBatch(q.item, q.event, q.side, q.gap.double(), q.mask))
    assert len(set(lengths[pick[:12]].tolist())) >= 6
    return info, batch


def build(info, name: str, **cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(model_from_dict({"name": name, **SMALL[name], **cfg}), info)
    return model.double().eval()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)


def replace_seq(batch: Batch, fn) -> Batch:
    """The batch with every SequenceBatch (merged windows and per-type windows) passed through ``fn``."""
    return Batch(batch.label, batch.cat, batch.num, batch.group, {n: fn(s) for n, s in batch.seqs.items()},
                 {n: {c: fn(w) for c, w in ws.items()} for n, ws in batch.windows.items()})


def random_padding(batch: Batch, info: FeatureInfo, seed: int = 1) -> Batch:
    """Random ids and time gaps written into every padded slot (mask False) of every sequence."""
    g = torch.Generator().manual_seed(seed)
    q = info.sequences[0]

    def fill(s: SequenceBatch) -> SequenceBatch:
        pad = ~s.mask

        def ids(x, vocab):
            return torch.where(pad, torch.randint(1, info.vocab_sizes[vocab], x.shape, generator=g), x)

        side = s.side.clone()
        for i, v in enumerate(q.side_vocabs):
            side[..., i] = ids(s.side[..., i], v)
        gap = torch.where(pad, torch.rand(s.gap.shape, generator=g, dtype=s.gap.dtype) * 1e8, s.gap)
        return SequenceBatch(ids(s.item, q.item_vocab), ids(s.event, q.event_vocab), side, gap, s.mask)

    return replace_seq(batch, fill)


def rows(batch: Batch, idx) -> Batch:
    idx = torch.as_tensor(idx)

    def take(s: SequenceBatch) -> SequenceBatch:
        return SequenceBatch(s.item[idx], s.event[idx], s.side[idx], s.gap[idx], s.mask[idx])

    return Batch(batch.label[idx], batch.cat[idx], batch.num[idx], batch.group[idx], {n: take(s) for n, s in batch.seqs.items()},
                 {n: {c: take(w) for c, w in ws.items()} for n, ws in batch.windows.items()})


def randomise_padded_tokens(model, seed: int = 2):
    """Forward pre-hooks on every sequence block (a module called with tokens [B, L, D] and a bool mask [B, L]) that
    overwrite the tokens' padded slots with large random values: what a block reads there then shows in the output."""
    g = torch.Generator().manual_seed(seed)
    kinds = (GDPAPFFN, SequenceSelfAttention, SeedPooling, HierarchicalSeedPooling, TargetAttention)
    from kunlun.models.bst import TransformerLayer
    from kunlun.models.interformer import PersonalizedFFN, SequenceSummary
    kinds += (TransformerLayer, PersonalizedFFN, SequenceSummary)

    def hook(module, args):
        masks = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.bool and a.dim() == 2]
        if not masks:
            return None
        mask = masks[0]
        out = list(args)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 3 and a.shape[:2] == mask.shape:
                noise = torch.randn(a.shape, generator=g, dtype=a.dtype) * 10
                out[i] = torch.where(mask.unsqueeze(-1), a, noise)
        return tuple(out)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    assert handles, "no sequence block found"
    return handles


# ------------------------------------------------------------------------------ every model: padding and the batch

@pytest.mark.parametrize("name", sorted(MODELS))
def test_values_in_padded_slots_change_no_logit(ml, name):
    """Random ids and gaps in every padded event slot change no logit (a model that embeds or pools padding fails)."""
    info, batch = ml
    model = build(info, name)
    torch.testing.assert_close(logits(model, random_padding(batch, info)), logits(model, batch), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name,cfg", [
    ("kunlun", {}), ("kunlun", {"event_split": True}), ("kunlun", {"event_split": True, "stream_window": "own"}),
    ("kunlun", {"compskip": False, "num_layers": 3}), ("kunlun", {"seq_pooling": "pma", "window": 0}),
    ("kunlun", {"target_in_sequence": False}),
    ("interformer", {}), ("interformer", {"target_in_sequence": True}), ("bst", {}), ("bst", {"rotary_time": True, "position_embedding": True}),
    ("din", {}), ("din", {"target_in_sequence": True}),
])
def test_no_sequence_block_reads_a_padded_token(ml, name, cfg):
    """Inside the model: large random values written into the padded slots of every sequence block's input tokens
    (self-attention, PFFN, seed pooling, target attention, InterFormer's sequence summary) change no logit.
    A pooling or attention that ignores its key mask fails, even where the padded tokens it would read are zeros."""
    info, batch = ml
    model = build(info, name, **cfg)
    clean = logits(model, batch)
    handles = randomise_padded_tokens(model)
    try:
        noisy = logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(noisy, clean, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_example_is_scored_on_its_own(ml, name):
    """A row's logit does not depend on the other rows of its batch (eval mode): scored in the batch, alone, and in
    another order. A model that mixes examples (e.g. one batch-mean K/V for every example's PFFN) fails."""
    info, batch = ml
    model = build(info, name)
    full = logits(model, batch)
    alone = torch.cat([logits(model, rows(batch, [i])) for i in (0, 5, 11)])
    torch.testing.assert_close(alone, full[[0, 5, 11]], rtol=0, atol=1e-10)
    perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(model, rows(batch, perm)), full[perm], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["kunlun", "interformer", "bst", "din", "dnn", "dcnv2", "wukong"])
def test_a_real_event_reaches_the_logit(ml, name):
    """The history is read: changing one real event's item changes that row's logit and no other row's."""
    info, batch = ml
    model = build(info, name)
    row = int(batch.seqs["history"].mask.sum(1).argmax())

    def change(s: SequenceBatch) -> SequenceBatch:
        item = s.item.clone()
        item[row, -1] = item[row, -1] % (info.vocab_sizes[info.sequences[0].item_vocab] - 2) + 2
        return SequenceBatch(item, s.event, s.side, s.gap, s.mask)

    before, after = logits(model, batch), logits(model, replace_seq(batch, change))
    assert (before[row] - after[row]).abs() > 1e-6
    others = torch.arange(len(batch)) != row
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------ GDPA-PFFN

@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("acts", [["silu", "gelu"], ["relu"], ["silu", "gelu", "relu2", "identity"]])
def test_gdpa_pffn_is_its_formula(impl, acts):
    """out = RMSNorm(GDPA(LN(s), K, V) + LN(s)) + s with K = W_k·X_sum, V = W_v·X_sum; GDPA per head h:
    act_h(q_h·k_hᵀ)/√dh · v_h, no softmax, no row normalisation. Recomputed per example, head, query and key."""
    torch.manual_seed(0)
    heads, d, t, length = len(acts), 16, 3, 5
    m = GDPAPFFN(d, heads, acts if len(acts) > 1 else acts[0], kv_dim=12).double()
    with torch.no_grad():  # non-trivial norm affines, so a skipped or misplaced norm shows
        for p in (*m.norm_q.parameters(), *m.norm_out.parameters()):
            p.uniform_(0.5, 1.5)
    s, xs = torch.randn(2, length, d, dtype=torch.float64), torch.randn(2, t, 12, dtype=torch.float64)
    mask = torch.tensor([[True] * length, [False, False, True, True, True]])
    with ops.using(impl):
        out = m(s, xs, mask)
    dh = d // heads
    ref = torch.zeros_like(out)
    for b in range(2):
        q = F.layer_norm(s[b], (d,), m.norm_q.weight, m.norm_q.bias, m.norm_q.eps)
        k, v = xs[b] @ m.k.weight.T + m.k.bias, xs[b] @ m.v.weight.T + m.v.bias
        g = torch.zeros(length, d, dtype=torch.float64)
        for h in range(heads):
            c = slice(h * dh, (h + 1) * dh)
            for i in range(length):
                for j in range(t):
                    g[i, c] += ACTIVATIONS[acts[h % len(acts)]](q[i, c] @ k[j, c]) / math.sqrt(dh) * v[j, c]
        hsum = g + q
        eps = m.norm_out.eps if m.norm_out.eps is not None else torch.finfo(torch.float64).eps
        rms = hsum / torch.sqrt((hsum**2).mean(-1, keepdim=True) + eps) * m.norm_out.weight
        ref[b] = (rms + s[b]) * mask[b, :, None]
    torch.testing.assert_close(out, ref)


def pffn_inputs(model, batch):
    """(args, output) of every first-layer GDPA-PFFN call (at least one: a model whose PFFN stopped running fails)."""
    calls = []
    handles = [b.pffn.register_forward_hook(lambda mod, args, out: calls.append((args, out)))
               for b in model.layers[0].blocks.values() if b.pffn is not None]
    logits(model, batch)
    for h in handles:
        h.remove()
    assert calls, "no GDPA-PFFN ran in layer 0"
    return calls


@pytest.mark.parametrize("personalized", [True, False])
def test_pffn_is_personalised_by_the_examples_own_context(ml, personalized):
    """Two copies of one example that differ only in a non-sequence field (the user) get different GDPA-PFFN
    outputs on the same history when personalised, and identical ones with static K/V (personalized=false).
    A K/V shared by the batch (e.g. its mean) gives identical outputs and fails the personalised case."""
    info, batch = ml
    model = build(info, "kunlun", personalized=personalized, target_in_sequence=False)
    pair = rows(batch, [3, 3, 7])
    user = info.cat_vocabs.index("user")
    pair.cat[1, user] = pair.cat[0, user] % (info.vocab_sizes["user"] - 2) + 2  # another user, same history
    for args, out in pffn_inputs(model, pair):
        torch.testing.assert_close(args[0][0], args[0][1])  # same input tokens
        same = torch.allclose(out[0], out[1], rtol=0, atol=1e-12)
        assert same != personalized


def test_personalised_kv_is_the_layers_own_x_sum(ml):
    """The PFFN's K/V rows are X_sum = Gating(MLP(LCE(X))) of the layer's non-sequence tokens, example by example."""
    info, batch = ml
    model = build(info, "kunlun")
    layer = model.layers[0]
    seen = {}
    h1 = layer.summary.register_forward_hook(lambda m, a, o: seen.__setitem__("x_sum", o))
    h2 = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    calls = pffn_inputs(model, batch)
    h1.remove()
    h2.remove()
    torch.testing.assert_close(seen["x_sum"], layer.summary(seen["x"]))
    for args, _ in calls:
        torch.testing.assert_close(args[1], seen["x_sum"], rtol=0, atol=0)


# ------------------------------------------------------------------------------ seed pooling and SumKronLinear

@pytest.mark.parametrize("cls", ["pma", "hsp"])
def test_seed_pooling_reads_real_slots_only(cls):
    """Padded slots (any value) do not change the pooled tokens; a real slot does; a fully padded sequence pools
    to the seeds alone. HSP = PMA with S seeds then Σ_i Z_iᵀ·P·W_i (SumKronLinear)."""
    torch.manual_seed(0)
    pool = (SeedPooling(8, 2, 3) if cls == "pma" else HierarchicalSeedPooling(8, 2, 6, 3, rank=2)).double()
    s = torch.randn(3, 7, 8, dtype=torch.float64)
    mask = torch.tensor([[False, False, True, True, True, True, True], [True] * 7, [False] * 7])
    out = pool(s, mask)
    noisy = torch.where(mask.unsqueeze(-1), s, torch.randn_like(s) * 100)
    torch.testing.assert_close(pool(noisy, mask), out, rtol=0, atol=1e-10)
    moved = s.clone()
    moved[0, 4] += torch.randn(8, dtype=torch.float64)  # not a constant shift: the key LayerNorm would remove it
    assert not torch.allclose(pool(moved, mask)[0], out[0])
    pma = pool if cls == "pma" else pool.pool
    empty = pma.norm(pma.seeds + pma.attn.o.bias)  # no visible key: attention gives its output bias
    torch.testing.assert_close(pma(s[2:], mask[2:])[0], empty)
    if cls == "hsp":
        z = pool.pool(s, mask)
        torch.testing.assert_close(out, sum(pool.compress.z[i].T @ z @ pool.compress.w[i] for i in range(2)))


def test_seed_pooling_is_softmax_attention_of_the_seeds_over_real_tokens():
    """PMA: LN(seeds + MHA(seeds, LN(s))) with the softmax over the real slots only, recomputed per head."""
    torch.manual_seed(0)
    pool = SeedPooling(8, 2, 3).double()
    s = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True, True], [True] * 5])
    out = pool(s, mask)
    a = pool.attn
    for b in range(2):
        kv = F.layer_norm(s[b], (8,), pool.norm_kv.weight, pool.norm_kv.bias, pool.norm_kv.eps)[mask[b]]
        k, v = kv @ a.k.weight.T + a.k.bias, kv @ a.v.weight.T + a.v.bias
        heads = []
        for h in range(2):
            c = slice(4 * h, 4 * h + 4)
            w = torch.softmax(pool.seeds[:, c] @ k[:, c].T / 2.0, dim=-1)
            heads.append(w @ v[:, c])
        y = torch.cat(heads, dim=-1) @ a.o.weight.T + a.o.bias
        ref = F.layer_norm(pool.seeds + y, (8,), pool.norm.weight, pool.norm.bias, pool.norm.eps)
        torch.testing.assert_close(out[b], ref)


# ------------------------------------------------------------------------------ sliding window and rotary time

def attention_block(window: int) -> SequenceSelfAttention:
    torch.manual_seed(0)
    return SequenceSelfAttention(16, 2, window=window).double()


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("length,window", [(40, 6), (200, 16)])  # dense masked kernel; blocked band (L ≥ 4·3b)
def test_an_event_outside_the_window_cannot_change_a_token_and_one_inside_can(impl, length, window):
    blk = attention_block(window)
    s = torch.randn(2, length, 16, dtype=torch.float64)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, :3] = False
    tau = torch.rand(2, length, dtype=torch.float64) * 5
    i = length // 2
    with ops.using(impl):
        out = blk(s, mask, tau)
        for j, inside in ((i + window + 1, False), (i - window - 3, False), (i + window, True), (i - window, True)):
            moved = s.clone()
            moved[:, j] += torch.randn(16, dtype=torch.float64)  # not a constant shift, which the LayerNorm removes
            changed = blk(moved, mask, tau)[:, i]
            assert torch.allclose(changed, out[:, i], rtol=0, atol=1e-12) != inside, (j, inside)


@pytest.mark.parametrize("window", [0, 16])
def test_the_model_applies_the_window_it_declares(ml, window):
    """In a Kunlun model (one stream, full-size): a self-attention token's output ignores an event more than
    ``window`` slots away exactly when the window is on; full attention (window 0) reads it."""
    info, batch = ml
    model = build(info, "kunlun", window=window, event_split=False, num_layers=1)
    blk = model.layers[0].blocks["history"].attn
    assert blk.attn.window == window
    captured = []
    h = blk.register_forward_hook(lambda m, a, o: captured.append(a))
    logits(model, batch)
    h.remove()
    s, mask, tau = captured[0]
    full = mask.all(1)
    assert full.any()
    s, mask, tau = s[full], mask[full], tau[full]
    length = s.shape[1]
    out = blk(s, mask, tau)
    moved = s.clone()
    moved[:, 0] += torch.randn(moved.shape[-1], dtype=moved.dtype)  # the oldest slot: more than 16 slots from the newest
    far = (blk(moved, mask, tau)[:, -1] - out[:, -1]).abs().max()
    assert length - 1 > 16
    assert (far == 0) == bool(window), far


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_rotary_time_attention_depends_on_time_differences_only(impl):
    """Shifting every τ of a sequence by the same amount leaves self-attention unchanged; moving one event in time
    changes the outputs of the tokens that see it. Without τ, times cannot matter."""
    blk = attention_block(0)
    s = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    tau = torch.rand(2, 9, dtype=torch.float64) * 4
    with ops.using(impl):
        out = blk(s, mask, tau)
        torch.testing.assert_close(blk(s, mask, tau + 2.5), out)
        moved = tau.clone()
        moved[:, 3] += 1.0
        assert not torch.allclose(blk(s, mask, moved), out)
        assert not torch.allclose(blk(s, mask, None), out)


@pytest.mark.parametrize("name", ["kunlun", "interformer", "bst"])
def test_rotary_time_is_the_only_way_gaps_reach_the_model_without_time_buckets(ml, name):
    """With the time-gap buckets off, scaling every gap changes the logits through the rotary encoding of
    τ = log(1 + Δt / scale) when ``rotary_time`` is on, and changes nothing when it is off."""
    info, batch = ml

    def later(s: SequenceBatch) -> SequenceBatch:
        return SequenceBatch(s.item, s.event, s.side, s.gap * 5 + 7200, s.mask)

    for rotary in (True, False):
        model = build(info, name, time_buckets=0, rotary_time=rotary)
        moved = logits(model, replace_seq(batch, later))
        assert torch.allclose(moved, logits(model, batch), rtol=0, atol=1e-12) != rotary


def test_kunlun_streams_carry_log_time_gap_positions(ml):
    info, batch = ml
    model = build(info, "kunlun", event_split=False, target_in_sequence=True, num_layers=1)
    blk = model.layers[0].blocks["history"].attn
    captured = []
    h = blk.register_forward_hook(lambda m, a, o: captured.append(a))
    logits(model, batch)
    h.remove()
    _, mask, tau = captured[0]
    gap = batch.seqs["history"].gap
    expected = time_positions(torch.cat([gap, torch.zeros_like(gap[:, :1])], dim=1), model.config.time_scale)
    real = mask
    torch.testing.assert_close(tau[real], expected[real].to(tau.dtype))
    assert (tau[:, -1] == 0).all()  # the candidate sits at the request time


# ------------------------------------------------------------------------------ CompSkip

def layer_trace(model, batch):
    """Per (layer, stream): which of PFFN / self-attention / pooling ran, and each layer's interaction input."""
    ran, inter = {}, {}
    handles = []
    for i, layer in enumerate(model.layers):
        for name, blk in layer.blocks.items():
            for part in ("pffn", "attn", "pool"):
                mod = getattr(blk, part)
                if mod is not None:
                    handles.append(mod.register_forward_hook(
                        lambda m, a, o, key=(i, name, part): ran.__setitem__(key, ran.get(key, 0) + 1)))
        handles.append(layer.interaction.register_forward_hook(lambda m, a, o, i=i: inter.__setitem__(i, a[0])))
    logits(model, batch)
    for h in handles:
        h.remove()
    return ran, inter


def test_compskip_alternates_pffn_and_pooling_with_self_attention(ml):
    """Within a stream: even layers run GDPA-PFFN and pool a fresh summary and skip self-attention; odd layers run
    self-attention only and the interaction reuses the previous summary; a last odd layer pools once more after
    the interaction. ``compskip=false``: every layer runs everything."""
    info, batch = ml
    model = build(info, "kunlun", num_layers=4, light_scale=1.0)
    ran, inter = layer_trace(model, batch)
    names = [st.name for st in model.streams]
    for name in names:
        for i in range(4):
            even = i % 2 == 0
            assert ran.get((i, name, "pffn"), 0) == int(even)
            assert ran.get((i, name, "attn"), 0) == int(not even)
            assert ran.get((i, name, "pool"), 0) == (1 if even or i == 3 else 0)
    n = info.n_tokens
    for i in (1, 3):  # an odd layer mixes the same summaries as the layer before it
        torch.testing.assert_close(inter[i][:, n:], inter[i - 1][:, n:], rtol=0, atol=0)
    assert not torch.allclose(inter[2][:, n:], inter[1][:, n:])
    plain = build(info, "kunlun", num_layers=4, light_scale=1.0, compskip=False)
    ran, _ = layer_trace(plain, batch)
    assert all(ran.get((i, name, part), 0) == 1 for i in range(4) for name in names for part in ("pffn", "attn", "pool"))


# ------------------------------------------------------------------------------ event-level streams

@pytest.mark.parametrize("window", ["merged", "own"])
def test_each_event_stream_sees_only_its_own_events(ml, window):
    """Event-level personalisation: the 'liked' stream holds exactly the liked events (its mask counts them, its
    tokens ignore a change to a not-liked event) and the light 'not liked' stream exactly the others."""
    info, batch = ml
    model = build(info, "kunlun", stream_window=window, target_in_sequence=False, event_split=True)
    codes = {st.name: st.event_code for st in model.streams}
    assert set(codes) == {"history_liked", "history_not_liked"}
    h = batch.seqs["history"]
    seen = {}
    for name, blk in model.layers[0].blocks.items():
        blk.pffn.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, (a[0], a[2])))
    logits(model, batch)
    for name, (tokens, mask) in seen.items():
        want = (h.mask & (h.event == codes[name])).sum(1).clamp(max=tokens.shape[1])
        if window == "own":
            want = batch.windows["history"][codes[name]].mask.sum(1).clamp(max=tokens.shape[1])
        assert torch.equal(mask.sum(1), want)
    # change the newest not-liked event of the row that has most of them
    nl = codes["history_not_liked"]
    src = batch.windows["history"][nl] if window == "own" else h
    sel = src.mask & (src.event == nl)
    row = int(sel.sum(1).argmax())
    j = int(sel[row].nonzero().max())

    def change(s: SequenceBatch) -> SequenceBatch:
        if s is not src:
            return s
        item = s.item.clone()
        item[row, j] = item[row, j] % (info.vocab_sizes["item"] - 2) + 2
        return SequenceBatch(item, s.event, s.side, s.gap, s.mask)

    before = {k: v[0].clone() for k, v in seen.items()}
    seen.clear()
    logits(model, replace_seq(batch, change))
    torch.testing.assert_close(seen["history_liked"][0], before["history_liked"], rtol=0, atol=0)
    assert not torch.allclose(seen["history_not_liked"][0][row], before["history_not_liked"][row])


def test_light_streams_are_scaled_down(ml):
    """Non-primary event types get light_scale × width, heads, summary tokens, seeds, window, length and depth."""
    info, _ = ml
    model = build(info, "kunlun", event_split=True, d_model=32, num_heads=4, num_layers=4, window=16, num_seeds=8, seq_summary_tokens=4,
                  gdpa_activation=["silu"])
    st = {s.name: s for s in model.streams}
    full, light = st["history_liked"], st["history_not_liked"]
    assert (full.dim, full.heads, full.window, full.tokens, full.seeds, full.layers) == (32, 4, 16, 4, 8, 4)
    assert (light.dim, light.heads, light.window, light.tokens, light.seeds, light.layers) == (16, 2, 8, 2, 4, 2)
    assert light.length == round(MAX_LEN * 0.5) + 1 and full.length == MAX_LEN + 1  # + the candidate slot
    blk = model.layers[0].blocks["history_not_liked"]
    assert blk.pffn.dim == 16 and blk.pffn.heads == 2 and model.narrow["history_not_liked"].out_features == 16
    assert all("history_not_liked" not in layer.blocks or not any(
        getattr(layer.blocks["history_not_liked"], p) is not None for p in ("pffn", "attn")) for layer in model.layers[2:])
    assert model.layers[1].blocks["history_not_liked"].attn.attn.window == 8


def test_event_split_says_when_no_type_is_primary(ml, tmp_path):
    """event_split on a log whose event types are none of primary_events gives every type a full stream; the model
    says so in one note, and the trainer logs it when the run starts. Named primaries, or no split: no note."""
    info, _ = ml
    assert build(info, "kunlun", event_split=True).config_notes() == []  # "liked" is primary
    assert build(info, "kunlun", event_split=False, primary_events=["click"]).config_notes() == []
    model = build(info, "kunlun", event_split=True, primary_events=["click"])
    assert {st.dim for st in model.streams} == {model.config.d_model}  # the fallback: every stream full-size
    (note,) = model.config_notes()
    assert "'history'" in note and "liked, not_liked" in note and "model.primary_events=[liked]" in note
    from kunlun.config import load_config
    from kunlun.training.trainer import Trainer
    cfg = load_config(None, ["model.d_model=16", "model.num_layers=1", "model.num_heads=2", "data.max_seq_len=8",
                             "model.event_split=true", "model.primary_events=[click]", "train.threads=1"])
    lines: list[str] = []
    Trainer(cfg, prepare_dataset(cfg.data.dataset), tmp_path, progress=False, logger=lines.append)
    assert f"note: {note}" in lines


# ------------------------------------------------------------------------------ Wukong experts

def test_the_interaction_gives_each_expert_its_partition(ml):
    """In the model, the mixture's input is [X, every stream's summary] and expert e reads tokens e, e+E, …: a
    change to one input token moves only the outputs of the expert that owns it."""
    info, batch = ml
    model = build(info, "kunlun", wukong_experts=2)
    moe = model.layers[0].interaction
    n_in = info.n_tokens + sum(st.tokens for st in model.streams)
    assert [len(i) for i in moe.index] == [len(range(0, n_in, 2)), len(range(1, n_in, 2))]
    captured = []
    h = moe.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    logits(model, batch)
    h.remove()
    x = captured[0]
    assert x.shape[1] == n_in
    out = moe(x)
    split = moe.experts[0].n_fmb + moe.experts[0].n_lcb
    for t in (0, 1, n_in - 1):
        moved = x.clone()
        moved[:, t] += torch.randn(x.shape[-1], dtype=x.dtype)
        y = moe(moved)
        owner = t % 2
        mine, theirs = (slice(0, split), slice(split, None)) if owner == 0 else (slice(split, None), slice(0, split))
        torch.testing.assert_close(y[:, theirs], out[:, theirs], rtol=0, atol=0)
        assert not torch.allclose(y[:, mine], out[:, mine])


# ------------------------------------------------------------------------------ the candidate token

@pytest.mark.parametrize("name", ["kunlun", "interformer", "bst"])
def test_the_candidate_reaches_the_sequence_side_only_as_a_token(ml, name):
    """With static K/V (Kunlun) or the summaries read before any context mixing, the sequence side depends on the
    candidate item only through the candidate token: ``target_in_sequence`` on → the first sequence block's output
    changes with the candidate; off → it cannot."""
    info, batch = ml
    item = info.cat_vocabs.index("item")
    other = Batch(batch.label, batch.cat.clone(), batch.num, batch.group, batch.seqs, batch.windows)
    other.cat[:, item] = other.cat[:, item] % (info.vocab_sizes["item"] - 2) + 2
    extra = {"personalized": False} if name == "kunlun" else {}
    for target in (True, False):
        model = build(info, name, target_in_sequence=target, **extra)
        first = first_sequence_block(model)
        outs = []
        h = first.register_forward_hook(lambda m, a, o, outs=outs: outs.append(o[0] if isinstance(o, tuple) else o))
        logits(model, batch)
        logits(model, other)
        h.remove()
        assert len(outs) == 2  # one call per forward: the two outputs are of the same block
        a, b = outs
        assert torch.allclose(a, b, rtol=0, atol=1e-12) != target, (name, target)


def first_sequence_block(model):
    from kunlun.models.bst import TransformerLayer
    if hasattr(model, "layers") and hasattr(model.layers[0], "blocks"):  # Kunlun: the first stream's summary
        blk = next(iter(model.layers[0].blocks.values()))
        return blk.pool
    for m in model.modules():
        if isinstance(m, (TransformerLayer, TargetAttention)):
            return m
    return next(iter(model.s_summary[0].values()))  # InterFormer's first sequence summary (before any PFFN)


# ------------------------------------------------------------------------------ baselines' defining blocks

def test_interformer_pffn_is_a_per_example_generated_matrix():
    """PFFN(X_sum, S) = S + S·W_b with W_b = reshape(Linear(flatten(X_sum_b))) ∈ R^{D×D}; padded slots 0."""
    from kunlun.models.interformer import PersonalizedFFN

    torch.manual_seed(0)
    m = PersonalizedFFN(3, 4).double()
    with torch.no_grad():
        m.generate.weight.normal_()
    s, xs = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [False, True, True, True, True]])
    out = m(s, xs, mask)
    for b in range(2):
        w = (m.generate.weight @ xs[b].flatten() + m.generate.bias).view(4, 4)
        torch.testing.assert_close(out[b], (s[b] + s[b] @ w) * mask[b, :, None])
    swapped = m(s, xs.flip(0), mask)  # the other example's context: other weights on the same sequence
    assert not torch.allclose(swapped[0], out[0])


def test_interformer_sequence_summary_is_gated_cls_pma_and_recent_tokens(ml):
    """Cross Arch, sequence side: S_sum = Gating([CLS outputs, PMA tokens, K most recent real tokens])."""
    info, batch = ml
    model = build(info, "interformer")
    summ = model.s_summary[0]["history"]
    c, k = model.config.cls_tokens, model.config.recent_tokens
    s = torch.randn(3, c + 6, 16, dtype=torch.float64)
    mask = torch.ones(3, c + 6, dtype=torch.bool)
    mask[2, c:c + 5] = False  # one real event: its K most recent slots hold a padded one
    out = summ(s, mask)
    assert k == 2
    recent = s[:, -k:].clone()
    recent[2, 0] = 0  # row 2's one real event is its newest slot: the slot before it is padding and reads as zeros
    torch.testing.assert_close(out, summ.gate(torch.cat([s[:, :c], summ.pma(s, mask), recent], dim=1)))


def test_interformer_interaction_arch_is_dot_and_dcn_over_both_sides():
    """Interaction Arch: Z = [X; S_sum]; LN(X + reshape(W·[⟨z_i, z_j⟩ for i < j, CrossNet(flatten Z)] + b))."""
    from kunlun.models.interformer import DHENInteraction

    torch.manual_seed(0)
    n, t, d = 3, 2, 4
    m = DHENInteraction(n, t, d, cross_layers=1).double()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
    x, s_sum = torch.randn(2, n, d, dtype=torch.float64), torch.randn(2, t, d, dtype=torch.float64)
    out = m(x, s_sum)
    for b in range(2):
        z = torch.cat([x[b], s_sum[b]])
        dots = torch.stack([z[i] @ z[j] for i in range(n + t) for j in range(i + 1, n + t)])
        z0 = z.flatten()
        cross = z0 * (m.cross.layers[0].weight @ z0 + m.cross.layers[0].bias) + z0
        mixed = (m.combine.weight @ torch.cat([dots, cross]) + m.combine.bias).view(n, d)
        ref = F.layer_norm(x[b] + mixed, (d,), m.norm.weight, m.norm.bias, m.norm.eps)
        torch.testing.assert_close(out[b], ref)


def test_din_target_attention_is_its_activation_unit():
    """DIN: Σ_j w_j·h_j over real events, w_j = MLP_Dice([h_j, t, h_j − t, h_j ⊙ t]) — no softmax (doubling every
    weight's input scale is not normalised away), padded events weigh nothing."""
    torch.manual_seed(0)
    m = TargetAttention(4, [6]).double().eval()
    with torch.no_grad():
        m.acts[0].alpha.uniform_(0.1, 0.5)
        m.acts[0].bn.running_mean.uniform_(-0.5, 0.5)
        m.acts[0].bn.running_var.uniform_(0.5, 2.0)
    h, t = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    out = m(h, t, mask)
    bn = m.acts[0].bn
    for b in range(2):
        total = torch.zeros(4, dtype=torch.float64)
        for j in range(5):
            if not mask[b, j]:
                continue
            z = m.layers[0](torch.cat([h[b, j], t[b], h[b, j] - t[b], h[b, j] * t[b]]))
            p = torch.sigmoid((z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))
            a = p * z + (1 - p) * m.acts[0].alpha * z
            total += m.out(a)[0] * h[b, j]
        torch.testing.assert_close(out[b], total)


def test_bst_layer_is_post_norm_attention_then_leaky_relu_ffn():
    """BST's Transformer layer: S' = LN(S + MHA(S)); out = LN(S' + W2·LeakyReLU(W1·S')), keys masked."""
    from kunlun.models.bst import TransformerLayer

    torch.manual_seed(0)
    layer = TransformerLayer(8, 2, 2, dropout=0.0).double().eval()
    s = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [False, True, True, True, True]])
    out = layer(s, mask)
    a = layer.attn
    for b in range(2):
        keys = s[b][mask[b]]
        q, k, v = s[b] @ a.q.weight.T + a.q.bias, keys @ a.k.weight.T + a.k.bias, keys @ a.v.weight.T + a.v.bias
        heads = [torch.softmax(q[:, c] @ k[:, c].T / 2.0, -1) @ v[:, c] for c in (slice(0, 4), slice(4, 8))]
        att = torch.cat(heads, -1) @ a.o.weight.T + a.o.bias
        s1 = F.layer_norm(s[b] + att, (8,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        f1, f2 = layer.ffn.layers
        ffn = f2(F.leaky_relu(f1(s1)))
        torch.testing.assert_close(out[b], F.layer_norm(s1 + ffn, (8,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps))


def test_dcnv2_cross_layers_are_x0_times_linear_plus_residual():
    """x_{l+1} = x_0 ⊙ (W_l·x_l + b_l) + x_l, full-rank W_l, layer by layer."""
    torch.manual_seed(0)
    net = CrossNetV2(5, 3).double()
    x0 = torch.randn(4, 5, dtype=torch.float64)
    x = x0
    for layer in net.layers:
        x = x0 * (x @ layer.weight.T + layer.bias) + x
    torch.testing.assert_close(net(x0), x)
    # interactions of order l + 1 after l layers: with x0 scaled by c, a 2-layer net's output has a c³ term
    two = CrossNetV2(5, 2).double()
    f = [two(c * x0) for c in (1.0, 2.0, 3.0, 4.0)]
    third_diff = f[3] - 3 * f[2] + 3 * f[1] - f[0]  # ≠ 0 iff the polynomial in c has degree ≥ 3
    assert third_diff.abs().max() > 1e-6


def test_wukong_model_stacks_its_layers_and_each_reads_the_previous():
    """Wukong: l stacked FMB+LCB layers; layer i+1 reads layer i's output tokens (not the embeddings)."""
    from kunlun.blocks.wukong import WukongLayer

    info = FeatureInfo(("a", "b", "c"), {"a": 5, "b": 5, "c": 5}, 2, (), 4)
    torch.manual_seed(0)
    model = build_model(model_from_dict({"name": "wukong", "d_model": 4, "num_layers": 3, "fmb_tokens": 2, "lcb_tokens": 2,
                                         "fm_hidden": 8, "hidden": [8]}), info).double().eval()
    layers = [m for m in model.modules() if isinstance(m, WukongLayer)]
    assert len(layers) == 3
    io = []
    handles = [m.register_forward_hook(lambda m, a, o: io.append((a[0], o))) for m in layers]
    batch = Batch(torch.zeros(3), torch.tensor([[1, 2, 3], [2, 3, 4], [4, 1, 2]]), torch.randn(3, 2, dtype=torch.float64),
                  torch.zeros(3, dtype=torch.long), {})
    logits(model, batch)
    for h in handles:
        h.remove()
    assert io[0][0].shape == (3, 4, 4)  # 3 fields + the numeric token
    for (_, out), (nxt, _) in zip(io, io[1:]):
        torch.testing.assert_close(nxt, out, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dnn", "dcnv2", "wukong"])
def test_tabular_models_pool_a_history_as_the_mean_of_its_real_events(ml, name):
    """DNN, DCNv2 and Wukong read a sequence as one token: the mean of its real event tokens (not of every slot)."""
    from kunlun.models.dnn import pooled_tokens

    info, batch = ml
    model = build(info, name)
    with torch.no_grad():
        tokens = pooled_tokens(model.inputs, batch)
        _, seqs = model.inputs(batch)
    s, mask, _ = seqs["history"]
    for b in range(len(batch)):
        torch.testing.assert_close(tokens[b, -1], s[b][mask[b]].mean(0))


def test_din_dice_takes_its_training_statistics_over_real_events_only():
    """In training, Dice's batch norm normalises by the mean and variance of the real events (padding slots, any
    value, change nothing) and folds them into its running statistics as BatchNorm1d does; evaluation reads those."""
    from kunlun.blocks.interaction import Dice

    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64) * 2 + 1
    mask = torch.tensor([[True] * 5, [False, False, True, True, True], [False, False, False, False, True]])
    dice, ref = Dice(4).double().train(), torch.nn.BatchNorm1d(4, affine=False).double().train()
    with torch.no_grad():
        dice.alpha.uniform_(0.1, 0.5)
    out = dice(x, mask)
    real = x[mask]  # [9, 4]: the rows a plain BatchNorm1d would be given
    p = torch.sigmoid(ref(real))
    torch.testing.assert_close(out[mask], p * real + (1 - p) * dice.alpha * real)
    torch.testing.assert_close(dice.bn.running_mean, ref.running_mean)
    torch.testing.assert_close(dice.bn.running_var, ref.running_var)
    noisy = torch.where(mask.unsqueeze(-1), x, torch.randn_like(x) * 100)
    torch.testing.assert_close(Dice(4).double().train()(noisy, mask)[mask], Dice(4).double().train()(x, mask)[mask])


def test_din_target_attention_in_training_ignores_padded_events():
    """In training too (batch statistics), what sits in a padded history slot changes no pooled output."""
    torch.manual_seed(0)
    att = TargetAttention(4, [6, 3]).double().train()
    h, t = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True], [False, False, False, False, True]])
    noisy = torch.where(mask.unsqueeze(-1), h, torch.randn_like(h) * 100)
    torch.testing.assert_close(att(noisy, t, mask), att(h, t, mask))


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"logistic_regression"}))  # LR's tables are its weights, from 0
def test_every_embedding_table_starts_at_the_embedding_std(ml, name):
    """Every nn.Embedding of a model, wherever it sits (vocabulary tables, time-gap buckets, …), starts as N(0, σ²) with
    the model's embedding σ: a table left at torch's N(0, 1) adds a term ~20× the others to every token it touches."""
    from kunlun.blocks.embeddings import EMBEDDING_STD

    info, _ = ml
    model = build_model(model_from_dict({"name": name}), info)
    std = getattr(model.config, "embedding_std", EMBEDDING_STD)
    tables = [(n, m.weight) for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    assert tables
    for n, w in tables:
        rows = w[1:] if w.shape[0] > 1 else w  # row 0 is padding (zeros) in the vocabulary tables
        assert 0.7 * std < rows.std().item() < 1.3 * std, (n, rows.std().item(), std)
