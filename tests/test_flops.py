"""FLOPs: the analytic counts (``flops_by_component``: the model's work) against what one real forward dispatches
(``kunlun.models.flop_count``: executed FLOPs, counted from the aten ops on the fast path unless a test says otherwise).

The two differ by exactly the documented padding of the attention kernels, which the checks below add to the
analytic figure from each attention module's *declared* window (``self.window``) and the lengths it is really called
with: a dense masked kernel scores all L² query–key pairs, the blocked band nb·b·3b, where the model's work is the
band's ``band_pairs(L, W)``; every other matrix product runs exactly as counted analytically (GDPA included: its
per-head products, no block-diagonal zero blocks). A second check reads the
masks the attention kernels are given (key padding forced off, so only the band masks): executed − hidden must be the
band the module declares — the window the forward *applies*, not the one it declares, decides the count.
"""

import numpy as np
import pytest
import torch

from kunlun import ops
from kunlun.blocks.attention import MultiHeadAttention, SequenceSelfAttention
from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import model_from_dict
from kunlun.data.batches import Batch, Batcher
from kunlun.data.registry import prepare_dataset
from kunlun.data.tabular import FRAPPE_FIELDS
from kunlun.models import build_model
from kunlun.models.flop_count import UncountedOp, count_flops, executed_count, executed_flops_per_example
from kunlun.ops.attention import band_pairs, block_size, blocked_pays, softmax_attention


def kernel_pairs(length: int, window: int) -> int:
    """Query–key pairs the selected attention kernel computes for one head of an L × L self-attention."""
    if ops.current() != "reference" and window and blocked_pays(length, window):
        b = block_size(window)
        return -(-length // b) * b * 3 * b  # nb blocks of b queries × 3b keys
    return length * length  # the reference's Q·Kᵀ and the dense masked kernel: every pair


def blocked_visible_pairs(length: int, window: int) -> int:
    """Pairs the blocked band's mask leaves visible with no padding key: the band, plus the band keys of the
    padded query slots of the last block, plus 3b for a padded query that sees no key (the kernel unmasks it)."""
    b = block_size(window)
    n = 0
    for i in range(-(-length // b) * b):
        start = (i // b - 1) * b
        seen = sum(1 for j in range(start, start + 3 * b) if 0 <= j < length and abs(i - j) <= window)
        n += seen or 3 * b
    return n


def applied_pairs(length: int, window: int) -> int:
    if ops.current() != "reference" and window and blocked_pays(length, window):
        return blocked_visible_pairs(length, window)
    return band_pairs(length, window) if window else length * length


def attention_calls(model, run, full_keys: bool = False):
    """Run ``run()`` recording every MultiHeadAttention call (module, batch, Lq, Lk); ``full_keys``: every key
    mask all True (the ops dispatched depend on shapes only, not on the mask's values)."""
    calls = []

    def attention(m, args, kwargs):
        query, kv, key_mask = args[:3]
        calls.append((m, kv.shape[0], query.shape[-2], kv.shape[-2]))
        if full_keys:
            return (query, kv, torch.ones_like(key_mask), *args[3:]), kwargs

    hooks = [m.register_forward_pre_hook(attention, with_kwargs=True) for m in model.modules() if isinstance(m, MultiHeadAttention)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return out, calls


def check_executed(model, batch) -> None:
    """Counted executed FLOPs = analytic (every padded slot) + what the attention kernels compute outside the band."""
    count, calls = attention_calls(model, lambda: count_flops(model, batch))
    padding = sum(4 * m.dim * b * (kernel_pairs(lk, m.window) - band_pairs(lk, m.window))
                  for m, b, lq, lk in calls if m.window and lq == lk)
    assert count.flops == len(batch) * model.flops_per_example() + padding, (count.by_op, model.flops_by_component())
    assert count.flops >= len(batch) * model.flops_per_example()


def check_applied(model, batch) -> None:
    """Counted FLOPs less the pairs the kernels' masks hide (no padding key) = analytic + the blocked layout's
    padded query slots: the band the forward applies is the one the model declares."""
    count, calls = attention_calls(model, lambda: count_flops(model, batch), full_keys=True)
    extra = sum(4 * m.dim * b * (applied_pairs(lk, m.window) - band_pairs(lk, m.window))
                for m, b, lq, lk in calls if m.window and lq == lk)
    assert count.flops - count.hidden == len(batch) * model.flops_per_example() + extra


def check_counts(model, batch) -> None:
    check_executed(model, batch)
    check_applied(model, batch)


KUNLUN_CONFIGS = [
    ({"name": "kunlun"}, 50),  # window 16 (light stream 8) on 51 / 26 slots: the dense masked kernel
    ({"name": "kunlun"}, 200),  # 201 / 101 slots: the blocked band
    ({"name": "kunlun", "window": 0}, 200),  # full attention
    ({"name": "kunlun", "event_split": False}, 200),
    ({"name": "kunlun", "event_split": False}, 50),
    ({"name": "kunlun", "compskip": False}, 200),
    ({"name": "kunlun", "compskip": False, "window": 0}, 50),
    ({"name": "kunlun", "event_split": True, "stream_window": "own", "num_layers": 3}, 200),
    ({"name": "kunlun", "d_model": 24, "num_layers": 3, "num_heads": 3, "window": 4, "kron_rank": 3,
      "gdpa_activation": ["silu", "gelu", "relu2"], "compskip": False}, 17),
    ({"name": "kunlun", "num_layers": 3, "seq_pooling": "pma", "personalized": False, "wukong_experts": 3,
      "rotary_time": False, "window": 0}, 12),
    ({"name": "kunlun", "num_layers": 4, "window": 100}, 20),  # window wider than L
    ({"name": "kunlun", "num_layers": 1, "summary_gate": "glu", "interaction_input": "summary"}, 10),
    ({"name": "kunlun", "summary_gate": "none", "personalized": False, "interaction_input": "summary",
      "compskip_min_layers": 1, "target_in_sequence": False}, 10),
]


@pytest.mark.parametrize("model_cfg,max_len", KUNLUN_CONFIGS + [({"name": "logistic_regression"}, 10)])
def test_counted_flops_are_the_analytic_plus_the_attention_kernels_padding(model_cfg, max_len):
    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict(model_cfg), FeatureInfo.from_encoder(p.encoder(), max_len))
    batch = Batcher(p, "valid", max_len, event_windows=model.event_windows).batch(np.arange(5))
    check_counts(model, batch)
    if model_cfg["name"] == "kunlun":
        parts = model.flops_by_component()
        assert {"self_attention", "gdpa_pffn", "seed_pooling", "interaction", "output"} <= set(parts)
        cfg = model.config
        assert ("nonseq_summary" in parts) == (cfg.personalized or cfg.interaction_input == "summary")
        assert all(v > 0 for v in parts.values())


def test_the_configs_above_run_both_attention_kernels():
    p = prepare_dataset("ml-latest-small")
    seen = set()
    for model_cfg, max_len in KUNLUN_CONFIGS[:2]:
        model = build_model(model_from_dict(model_cfg), FeatureInfo.from_encoder(p.encoder(), max_len))
        batch = Batcher(p, "valid", max_len, event_windows=model.event_windows).batch(np.arange(2))
        _, calls = attention_calls(model, lambda model=model, batch=batch: model(batch))
        seen |= {("blocked" if blocked_pays(lk, m.window) else "dense") for m, b, lq, lk in calls if m.window and lq == lk}
    assert {"blocked", "dense"} <= seen


@pytest.mark.parametrize("model_cfg,max_len", [({"name": "kunlun"}, 200), ({"name": "kunlun", "event_split": False}, 50),
                                               ({"name": "interformer"}, 20)])
def test_reference_ops_count_every_score(model_cfg, max_len):
    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict(model_cfg), FeatureInfo.from_encoder(p.encoder(), max_len))
    batch = Batcher(p, "valid", max_len, event_windows=model.event_windows).batch(np.arange(4))
    with ops.using("reference"):
        check_executed(model, batch)
    fast = count_flops(model, batch).flops
    with ops.using("reference"):
        reference = count_flops(model, batch).flops
    assert (fast < reference) == (max_len == 200 and model_cfg["name"] == "kunlun")  # the blocked band saves work


def test_flops_of_non_sequence_path():
    # a Frappe-like schema: context fields only; Kunlun runs stacked Wukong layers
    vocab_sizes = {f: 10 for f in FRAPPE_FIELDS}
    info = FeatureInfo(tuple(FRAPPE_FIELDS), vocab_sizes, 0, (), 1)
    model = build_model(model_from_dict({"name": "kunlun"}), info)
    batch_cat = torch.randint(0, 10, (9, len(FRAPPE_FIELDS)))
    b = Batch(torch.zeros(9), batch_cat, torch.zeros(9, 0), torch.zeros(9, dtype=torch.long), {})
    check_counts(model, b)
    assert set(model.flops_by_component()) == {"tokens", "interaction", "output"}


MODEL_NAMES = ["logistic_regression", "dnn", "dcnv2", "wukong", "din", "bst", "interformer", "kunlun"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_counts_its_flops_exactly(name):
    from kunlun.models import MODELS

    assert name in MODELS
    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict({"name": name}), FeatureInfo.from_encoder(p.encoder(), 9))
    batcher = Batcher(p, "valid", 9, event_windows=model.event_windows)
    batch = batcher.batch(np.arange(11))
    check_counts(model, batch)
    # no work per batch (a learned query projected once for all): counted per example is the same at any batch size
    assert count_flops(model, batcher.batch(np.arange(22))).flops == 2 * count_flops(model, batch).flops
    assert model(batch).shape == (11,)


def test_registry_has_exactly_the_documented_models():
    from kunlun.models import MODELS

    assert set(MODELS) == set(MODEL_NAMES)


# ----------------------------------------------------------------- the checks catch what they are for
def _window_zero_forward(self, query, kv, key_mask, tau=None):
    """MultiHeadAttention.forward with the window the reviewer broke: 0 applied, ``self.window`` still declared."""
    from kunlun.blocks.attention import merge_heads, rotary, split_heads

    q = split_heads(self.q(query) if self.q is not None else query, self.heads)
    k, v = split_heads(self.k(kv), self.heads), split_heads(self.v(kv), self.heads)
    if tau is not None:
        q, k = rotary(tau, self.rotary_base, q, k)
    return self.o(merge_heads(softmax_attention(q, k, v, key_mask, 0, self.matmul.emulated_or_none())))


@pytest.mark.parametrize("max_len", [50, 200])  # the dense masked kernel, the blocked band
def test_a_window_applied_other_than_declared_fails(monkeypatch, max_len):
    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict({"name": "kunlun"}), FeatureInfo.from_encoder(p.encoder(), max_len))
    batch = Batcher(p, "valid", max_len, event_windows=model.event_windows).batch(np.arange(3))
    check_counts(model, batch)
    monkeypatch.setattr(MultiHeadAttention, "forward", _window_zero_forward)
    with pytest.raises(AssertionError):
        check_applied(model, batch)  # both lengths: the kernels' masks hold no band
    if max_len == 200:  # …and the dense kernel runs where the blocked one should
        with pytest.raises(AssertionError):
            check_executed(model, batch)


@pytest.mark.parametrize("name,skipped", [("kunlun", SequenceSelfAttention), ("interformer", SequenceSelfAttention),
                                          ("bst", MultiHeadAttention)])
def test_a_skipped_attention_module_fails(monkeypatch, name, skipped):
    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict({"name": name}), FeatureInfo.from_encoder(p.encoder(), 20))
    batch = Batcher(p, "valid", 20, event_windows=model.event_windows).batch(np.arange(3))
    check_counts(model, batch)
    monkeypatch.setattr(skipped, "forward", lambda self, x, *args, **kwargs: x)  # the module returns its input
    with pytest.raises(AssertionError):
        check_executed(model, batch)


def test_cpu_fused_attention_is_counted_and_an_unknown_product_is_an_error():
    q, k, v = (torch.randn(2, 3, 7, 4) for _ in range(3))
    mask = torch.zeros(2, 1, 7, 7).masked_fill(torch.eye(7, dtype=torch.bool), torch.finfo(torch.float32).min / 2)

    class Attend(torch.nn.Module):
        def forward(self, batch):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    one = Batch(torch.zeros(2), torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2), {})
    c = count_flops(Attend(), one)
    assert c.flops == 2 * 2 * (2 * 3 * 7 * 7 * 4)  # Q·Kᵀ and A·V, every pair (torch's FlopCounterMode: 0 on CPU)
    assert c.hidden == 2 * 2 * (2 * 3 * 7 * 4)  # the diagonal the mask hides

    class Dot(torch.nn.Module):
        def forward(self, batch):
            return torch.mv(torch.randn(3, 4), torch.randn(4))

    with pytest.raises(UncountedOp, match="aten.mv"):
        count_flops(Dot(), one)


def test_executed_flops_are_counted_once_per_configuration_and_shape():
    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict({"name": "kunlun"}), FeatureInfo.from_encoder(p.encoder(), 20))
    batcher = Batcher(p, "valid", 20, event_windows=model.event_windows)
    from kunlun.models import flop_count

    flop_count._CACHE.clear()
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    first = executed_count(model, batcher.batch(np.arange(4)))
    assert executed_count(model, batcher.batch(np.arange(4, 8))) is first and len(forwards) == 1
    executed_flops_per_example(model, batcher.batch(np.arange(5)))  # another shape: counted again
    assert len(forwards) == 2
    assert first.per_example == executed_flops_per_example(model, batcher.batch(np.arange(5)))
    assert model.training  # the count's eval mode is undone


@pytest.mark.parametrize("name", ["kunlun", "interformer", "din", "bst", "dcnv2"])
def test_several_sequences_per_example(tmp_path, name):
    rows = ["y,u,item,t,clicks,click_t,buys,buy_t"]
    for i in range(40):
        k, j = i % 5, i % 3
        clicks = "|".join(f"i{(i + n) % 7}" for n in range(k))
        buys = "|".join(f"i{(i * n) % 7}" for n in range(j))
        rows.append(f"{i % 2},u{i % 4},i{i % 7},{1000 + i},{clicks},{'|'.join(str(900 + n) for n in range(k))},"
                    f"{buys},{'|'.join(str(950 + n) for n in range(j))}")
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "s.yaml").write_text("""
files: {train: d.csv, valid: d.csv}
label: y
group: u
time: t
categorical: [u, item]
sequences:
  - {name: clicks, item: clicks, item_vocab: item, time: click_t}
  - {name: buys, item: buys, item_vocab: item, time: buy_t}
""")
    p = prepare_dataset(str(tmp_path / "s.yaml"))
    model = build_model(model_from_dict({"name": name}), FeatureInfo.from_encoder(p.encoder(), 4))
    model.eval()
    batch = Batcher(p, "train", 4, event_windows=True).batch(np.arange(40))
    assert set(batch.seqs) == {"clicks", "buys"}
    check_counts(model, batch)
    assert torch.isfinite(model(batch)).all()


def test_event_level_personalisation_streams():
    p = prepare_dataset("ml-latest-small")
    info = FeatureInfo.from_encoder(p.encoder(), 20)
    assert info.sequences[0].event_names == ("liked", "not_liked")
    model = build_model(model_from_dict({"name": "kunlun", "num_layers": 3, "event_split": True}), info)
    by_name = {st.name: st for st in model.streams}
    assert set(by_name) == {"history_liked", "history_not_liked"}
    full, light = by_name["history_liked"], by_name["history_not_liked"]
    assert (full.dim, full.heads, full.length, full.layers) == (32, 2, 20 + 1, 3)  # + the candidate slot
    assert (light.dim, light.heads, light.length, light.layers) == (16, 1, 10 + 1, 2)
    assert light.event_code == 3 and full.event_code == 2
    whole = build_model(model_from_dict({"name": "kunlun", "num_layers": 3, "event_split": False}), info)
    assert [st.name for st in whole.streams] == ["history"]
    # the saving is against giving every event type the full configuration
    uniform = build_model(model_from_dict({"name": "kunlun", "num_layers": 3, "light_scale": 1.0, "event_split": True}), info)
    assert model.flops_per_example() < 0.8 * uniform.flops_per_example()


@pytest.mark.parametrize("model_cfg", [{"name": "din"}, {"name": "bst"}, {"name": "interformer"},
                                       {"name": "kunlun", "event_split": False}, {"name": "kunlun", "event_split": False, "window": 0}])
def test_useful_flops_are_what_an_unpadded_example_costs(model_cfg):
    # useful FLOPs of an example with L real events = the FLOPs counted for the same example run without padding
    # (a model built for exactly L slots; FLOPs depend on shapes, not weights), less the pairs a band masks out
    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict(model_cfg), FeatureInfo.from_encoder(p.encoder(), 20))
    idx = np.arange(3000)  # training rows in file order: users' early events have short histories
    counts = model.token_counts(Batcher(p, "train", 20, event_windows=True).batch(idx))
    real = next(iter(Batcher(p, "train", 20).batch(idx).seqs.values())).mask.sum(1).numpy()
    picks = [int(np.flatnonzero(real == L)[0]) for L in (2, 7, 13) if (real == L).any()]
    assert len(picks) >= 2
    for i in picks:
        L = int(real[i])
        unpadded = build_model(model_from_dict(model_cfg), FeatureInfo.from_encoder(p.encoder(), L)).eval()
        one = Batcher(p, "train", L, event_windows=True).batch(idx[i : i + 1])
        assert bool(one.seqs[next(iter(one.seqs))].mask.all())
        c = count_flops(unpadded, one)  # no padding: executed less what the masks hide is the useful work
        assert c.flops - c.hidden == model.flops_per_example({k: int(v[i]) for k, v in counts.items()})
    # the mean over examples, grouped by distinct lengths, equals the plain per-example mean
    batches = [Batcher(p, "train", 20, event_windows=True).batch(idx[:1500]), Batcher(p, "train", 20, event_windows=True).batch(idx[1500:])]
    explicit = np.mean([model.flops_per_example({k: int(v[i]) for k, v in counts.items()}) for i in range(len(idx))])
    assert model.useful_flops_per_example(batches) == pytest.approx(explicit, rel=1e-12)
    assert model.useful_flops_per_example(batches) < model.flops_per_example()  # padding is not useful work


def test_kunlun_stream_token_counts_match_the_forward_selection():
    from kunlun.blocks.embeddings import select_events
    from kunlun.models.kunlun import TokenKey

    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict({"name": "kunlun", "event_split": True}), FeatureInfo.from_encoder(p.encoder(), 30))
    batch = Batcher(p, "valid", 30, event_windows=True).batch(np.arange(300))
    counts = model.token_counts(batch)
    for st in model.streams:
        sq = batch.seqs[st.source]
        _, mask, _ = select_events(torch.zeros(*sq.mask.shape, 1), sq.mask, sq.event, st.event_code, st.length - 1)
        torch.testing.assert_close(counts[TokenKey.stream(st.name)], mask.sum(1) + 1)
    assert torch.equal(counts[TokenKey.window(model.streams[0].source)], batch.seqs[model.streams[0].source].mask.sum(1))
    assert model.useful_flops_per_example([batch]) < model.flops_per_example()


def test_kunlun_own_window_token_counts_are_the_streams_real_events():
    from kunlun.models.kunlun import TokenKey

    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict({"name": "kunlun", "stream_window": "own", "event_split": True}), FeatureInfo.from_encoder(p.encoder(), 30))
    assert model.event_windows
    batch = Batcher(p, "valid", 30, event_windows=True).batch(np.arange(300))
    counts = model.token_counts(batch)
    for st in model.streams:
        window = batch.windows[st.source][st.event_code]
        torch.testing.assert_close(counts[TokenKey.stream(st.name)], window.mask[:, -(st.length - 1):].sum(1) + 1)
    light = next(st for st in model.streams if st.length < 31)  # a light stream holds fewer of its events
    assert (counts[TokenKey.stream(light.name)] < batch.windows[light.source][light.event_code].mask.sum(1) + 1).any()
    assert model.useful_flops_per_example([batch]) < model.flops_per_example()


def test_useful_flops_of_a_large_split_come_from_a_sample(monkeypatch):
    from kunlun.training import trainer

    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict({"name": "kunlun"}), FeatureInfo.from_encoder(p.encoder(), 50))
    batcher = Batcher(p, "valid", 50, event_windows=True)
    exact = model.useful_flops_per_example(batcher.iterate(2048))
    assert trainer.useful_flops(model, batcher, 2048) == exact  # small split: every row
    monkeypatch.setattr(trainer, "USEFUL_FLOPS_SAMPLE", 2000)
    sampled = trainer.useful_flops(model, batcher, 512)
    assert sampled != exact and sampled == pytest.approx(exact, rel=0.03)


def test_the_run_record_says_which_flops_are_which(tmp_path):
    import json

    from kunlun.config import load_config
    from kunlun.runs import list_runs
    from kunlun.scaling.points import load_points
    from kunlun.training.runner import train_run
    from kunlun.training.trainer import build

    cfg = load_config(None, ["model.d_model=8", "model.num_layers=2", "train.max_steps=2", "train.batch_size=32",
                             "train.eval_batch_size=4096", "train.threads=1", "data.max_seq_len=30"], epochs=1)
    final = train_run(cfg, tmp_path / "runs" / "r", progress=False, logger=lambda _: None)
    p = prepare_dataset("ml-latest-small")
    model = build(cfg, p)
    counted = count_flops(model, Batcher(p, "train", 30, event_windows=model.event_windows).batch(np.arange(8)))
    assert final["flops_per_example"] == final["executed_flops_per_example"] == counted.per_example
    assert final["analytic_flops_per_example"] == model.flops_per_example() == sum(final["flops_by_component"].values())
    assert final["flops_per_example"] > final["analytic_flops_per_example"] > final["useful_flops_per_example"] > 0
    assert final["train_compute"] == 3 * final["flops_per_example"] * final["train_examples"]
    assert set(final["flops_kinds"]) >= {"flops_per_example", "useful_flops_per_example"}
    # read back by the run table and the scaling points; a record from before counted FLOPs loads as it did
    assert list_runs(tmp_path / "runs")[0]["flops_per_example"] == final["flops_per_example"]
    (pt,) = load_points([tmp_path / "runs" / "r"])
    assert pt.compute_kind == "useful" and pt.flops_per_example == final["useful_flops_per_example"]
    old = {k: v for k, v in final.items() if k not in ("executed_flops_per_example", "analytic_flops_per_example", "flops_kinds")}
    (tmp_path / "runs" / "r" / "final.json").write_text(json.dumps(old, default=str))
    assert list_runs(tmp_path / "runs")[0]["flops_per_example"] == final["flops_per_example"]
    assert load_points([tmp_path / "runs" / "r"])[0].compute == pt.compute


def test_a_forward_the_counter_cannot_count_still_trains_and_says_so(tmp_path, monkeypatch):
    """An op without a FLOP formula (a kernel of another device or torch release) does not stop a run: the analytic
    figure at every padded slot stands in for the executed one, and the log and ``flops_kinds`` say it was not counted."""
    from kunlun.config import load_config
    from kunlun.models.base import RankingModel
    from kunlun.training.runner import train_run

    def uncountable(self, batch):
        raise UncountedOp("aten.some_new_kernel runs in this forward and has no FLOP formula")

    monkeypatch.setattr(RankingModel, "executed_flops_per_example", uncountable)
    cfg = load_config(None, ["model.d_model=8", "model.num_layers=1", "train.max_steps=1", "train.batch_size=32",
                             "train.threads=1", "data.max_seq_len=8"], epochs=1)
    lines = []
    final = train_run(cfg, tmp_path / "r", progress=False, logger=lines.append)
    assert final["flops_per_example"] == final["analytic_flops_per_example"]
    assert "NOT counted" in final["flops_kinds"]["flops_per_example"]
    assert any("executed FLOPs not counted" in line and "some_new_kernel" in line for line in lines)
