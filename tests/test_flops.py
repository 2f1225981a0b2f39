
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kunlun import ops
from kunlun.blocks.attention import MultiHeadAttention
from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import model_from_dict
from kunlun.data.batches import Batcher
from kunlun.data.registry import prepare_dataset
from kunlun.data.tabular import FRAPPE_FIELDS
from kunlun.models import build_model
from kunlun.ops.attention import band_pairs


def counted_flops(model, batch):
    """torch's FLOP counter over the reference ops, less the scores a sliding window masks out: the counter sees
    every L × L score, the model's work (what ``flops`` counts) is the band's pairs."""
    masked = []

    def hook(module, args, out):
        length = args[1].shape[1]
        masked.append(2 * 2 * (length * length - band_pairs(length, module.window)) * module.dim * args[1].shape[0])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MultiHeadAttention) and m.window]
    try:
        with ops.using("reference"), FlopCounterMode(display=False) as fc:
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return fc.get_total_flops() - sum(masked)


@pytest.mark.parametrize(
    "model_cfg,max_len",
    [
        ({"name": "kunlun"}, 50),
        ({"name": "kunlun", "d_model": 24, "num_layers": 3, "num_heads": 3, "window": 4, "kron_rank": 3,
          "gdpa_activation": ["silu", "gelu", "relu2"], "compskip": False}, 17),
        ({"name": "kunlun", "num_layers": 3, "seq_pooling": "pma", "personalized": False, "wukong_experts": 3,
          "rotary_time": False, "window": 0}, 12),
        ({"name": "kunlun", "num_layers": 4, "window": 100}, 20),  # window wider than L: dense path
        ({"name": "kunlun", "num_layers": 1, "summary_gate": "glu", "interaction_input": "summary"}, 10),
        ({"name": "kunlun", "summary_gate": "none", "personalized": False, "interaction_input": "summary",
          "compskip_min_layers": 1, "target_in_sequence": False}, 10),
        ({"name": "kunlun", "stream_window": "own", "num_layers": 3}, 14),
        ({"name": "logistic_regression"}, 10),
    ],
)
def test_analytic_flops_equal_flop_counter(model_cfg, max_len):
    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict(model_cfg), FeatureInfo.from_encoder(p.encoder(), max_len))
    batch = Batcher(p, "valid", max_len, event_windows=True).batch(np.arange(37))
    assert counted_flops(model, batch) == 37 * model.flops_per_example()
    if model_cfg["name"] == "kunlun":
        parts = model.flops_by_component()
        assert {"self_attention", "gdpa_pffn", "seed_pooling", "interaction", "output"} <= set(parts)
        cfg = model.config
        assert ("nonseq_summary" in parts) == (cfg.personalized or cfg.interaction_input == "summary")
        assert all(v > 0 for v in parts.values())


def test_flops_of_non_sequence_path():
    # a Frappe-like schema: context fields only; Kunlun runs stacked Wukong layers
    vocab_sizes = {f: 10 for f in FRAPPE_FIELDS}
    info = FeatureInfo(tuple(FRAPPE_FIELDS), vocab_sizes, 0, (), 1)
    model = build_model(model_from_dict({"name": "kunlun"}), info)
    batch_cat = torch.randint(0, 10, (9, len(FRAPPE_FIELDS)))
    from kunlun.data.batches import Batch

    b = Batch(torch.zeros(9), batch_cat, torch.zeros(9, 0), torch.zeros(9, dtype=torch.long), {})
    assert counted_flops(model, b) == 9 * model.flops_per_example()
    assert set(model.flops_by_component()) == {"tokens", "interaction", "output"}


@pytest.mark.parametrize("name", ["logistic_regression", "dnn", "dcnv2", "wukong", "din", "bst", "interformer", "kunlun"])
def test_every_registered_model_counts_its_flops_exactly(name):
    from kunlun.models import MODELS

    assert name in MODELS
    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict({"name": name}), FeatureInfo.from_encoder(p.encoder(), 9))
    model.eval()  # BatchNorm (Dice) in eval mode: the count must not depend on it anyway
    batch = Batcher(p, "valid", 9, event_windows=True).batch(np.arange(11))
    assert counted_flops(model, batch) == 11 * model.flops_per_example()
    assert model(batch).shape == (11,)


def test_registry_has_exactly_the_documented_models():
    from kunlun.models import MODELS

    assert set(MODELS) == {"logistic_regression", "dnn", "dcnv2", "wukong", "din", "bst", "interformer", "kunlun"}


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
    assert counted_flops(model, batch) == 40 * model.flops_per_example()
    assert torch.isfinite(model(batch)).all()


def test_event_level_personalisation_streams():
    p = prepare_dataset("ml-latest-small")
    info = FeatureInfo.from_encoder(p.encoder(), 20)
    assert info.sequences[0].event_names == ("liked", "not_liked")
    model = build_model(model_from_dict({"name": "kunlun", "num_layers": 3}), info)
    by_name = {st.name: st for st in model.streams}
    assert set(by_name) == {"history_liked", "history_not_liked"}
    full, light = by_name["history_liked"], by_name["history_not_liked"]
    assert (full.dim, full.heads, full.length, full.layers) == (32, 2, 20 + 1, 3)  # + the candidate slot
    assert (light.dim, light.heads, light.length, light.layers) == (16, 1, 10 + 1, 2)
    assert light.event_code == 3 and full.event_code == 2
    whole = build_model(model_from_dict({"name": "kunlun", "num_layers": 3, "event_split": False}), info)
    assert [st.name for st in whole.streams] == ["history"]
    # the saving is against giving every event type the full configuration
    uniform = build_model(model_from_dict({"name": "kunlun", "num_layers": 3, "light_scale": 1.0}), info)
    assert model.flops_per_example() < 0.8 * uniform.flops_per_example()


@pytest.mark.parametrize("model_cfg", [{"name": "din"}, {"name": "bst"}, {"name": "interformer"},
                                       {"name": "kunlun", "event_split": False}, {"name": "kunlun", "event_split": False, "window": 0}])
def test_useful_flops_are_what_an_unpadded_example_costs(model_cfg):
    # useful FLOPs of an example with L real events = the FLOPs FlopCounterMode counts for the same example
    # run without padding (a model built for exactly L slots; FLOPs depend on shapes, not weights)
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
        assert counted_flops(unpadded, one) == model.flops_per_example({k: int(v[i]) for k, v in counts.items()})
    # the mean over examples, grouped by distinct lengths, equals the plain per-example mean
    batches = [Batcher(p, "train", 20, event_windows=True).batch(idx[:1500]), Batcher(p, "train", 20, event_windows=True).batch(idx[1500:])]
    explicit = np.mean([model.flops_per_example({k: int(v[i]) for k, v in counts.items()}) for i in range(len(idx))])
    assert model.useful_flops_per_example(batches) == pytest.approx(explicit, rel=1e-12)
    assert model.useful_flops_per_example(batches) < model.flops_per_example()  # padding is not useful work


def test_kunlun_stream_token_counts_match_the_forward_selection():
    from kunlun.blocks.embeddings import select_events
    from kunlun.models.kunlun import TokenKey

    p = prepare_dataset("ml-latest-small")
    model = build_model(model_from_dict({"name": "kunlun"}), FeatureInfo.from_encoder(p.encoder(), 30))
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
    model = build_model(model_from_dict({"name": "kunlun", "stream_window": "own"}), FeatureInfo.from_encoder(p.encoder(), 30))
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
