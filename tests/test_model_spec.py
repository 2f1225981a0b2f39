"""Spec fidelity of Kunlun and the sequence baselines: each switch does what its docstring says.

Small models on a few examples of the embedded MovieLens latest-small; every test takes well under a second
once the dataset is prepared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from conftest import ml_rows
from kunlun.blocks.attention import SequenceSelfAttention
from kunlun.blocks.embeddings import FeatureInfo, Inputs
from kunlun.blocks.interaction import TargetAttention
from kunlun.blocks.summary import NonSequenceSummary
from kunlun.config import model_from_dict, set_dotted
from kunlun.data.batches import SequenceBatch
from kunlun.models import build_model

SMALL = {"d_model": 16, "num_seeds": 4, "seq_summary_tokens": 2, "summary_tokens": 2, "fm_hidden": 16,
         "output_hidden": [16], "event_split": True}  # the event-split model (its streams are what these tests read)


@pytest.fixture(scope="module")
def ml():
    return ml_rows(24)


def kunlun(info, **cfg):
    torch.manual_seed(0)
    return build_model(model_from_dict({"name": "kunlun", **SMALL, **cfg}), info)


def capture(modules, pre: bool = False):
    """Forward hooks recording (module, args, output) of every call, in call order."""
    calls, handles = [], []
    for m in modules:
        if pre:
            handles.append(m.register_forward_pre_hook(lambda mod, args, calls=calls: calls.append((mod, args, None))))
        else:
            handles.append(m.register_forward_hook(lambda mod, args, out, calls=calls: calls.append((mod, args, out))))
    return calls, handles


# ---------------------------------------------------------------------------------------- 1. rotary_base

@pytest.mark.parametrize("name", ["kunlun", "interformer"])
def test_rotary_base_reaches_self_attention_and_changes_its_output(ml, name):
    info, batch = ml
    torch.manual_seed(0)
    a = build_model(model_from_dict({"name": name, "rotary_base": 10.0}), info)
    b = build_model(model_from_dict({"name": name, "rotary_base": 1000.0}), info)
    b.load_state_dict(a.state_dict())
    attn = {m: [x for x in m.modules() if isinstance(x, SequenceSelfAttention)] for m in (a, b)}
    assert attn[a] and all(x.attn.rotary_base == 10.0 for x in attn[a])
    assert all(x.attn.rotary_base == 1000.0 for x in attn[b])
    seen = {}
    for m in (a, b):
        calls, handles = capture(attn[m])
        m.eval()
        with torch.no_grad():
            m(batch)
        for h in handles:
            h.remove()
        seen[m] = calls[0]  # the first self-attention call: same input in both models
    (_, args_a, out_a), (_, args_b, out_b) = seen[a], seen[b]
    torch.testing.assert_close(args_a[0], args_b[0])
    assert args_a[2] is not None  # rotary positions (log time gaps) are passed
    assert not torch.allclose(out_a, out_b, atol=1e-5)  # only the rotary base differs


# ------------------------------------------------------------------- 2. every stream runs self-attention

def attention_calls(model, batch) -> dict[str, int]:
    counts = {st.name: 0 for st in model.streams}
    handles = []
    for layer in model.layers:
        for name, block in layer.blocks.items():
            if block.attn is not None:
                handles.append(block.attn.register_forward_hook(
                    lambda mod, args, out, name=name: counts.__setitem__(name, counts[name] + 1)))
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize(
    "cfg,liked,not_liked",
    [
        ({"num_layers": 1}, 1, 1),  # one layer: the whole block, attention included
        ({"num_layers": 2}, 1, 1),  # the default: the 1-layer light stream runs attention too
        ({"num_layers": 3}, 1, 1),  # light stream 2 layers deep: PFFN, then attention
        ({"num_layers": 4}, 2, 1),
        ({"num_layers": 1, "light_scale": 1.0}, 1, 1),
        ({"num_layers": 2, "light_scale": 1.0}, 1, 1),
        ({"num_layers": 3, "light_scale": 1.0}, 1, 1),
        ({"num_layers": 3, "compskip": False}, 3, 2),
        ({"num_layers": 2, "compskip_min_layers": 1}, 1, 0),  # the old schedule: the light stream never attends
        ({"num_layers": 1, "compskip_min_layers": 1}, 0, 0),
    ],
)
def test_attention_calls_per_stream(ml, cfg, liked, not_liked):
    info, batch = ml
    model = kunlun(info, **cfg)
    assert attention_calls(model, batch) == {"history_liked": liked, "history_not_liked": not_liked}


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_every_stream_attends_and_pools_without_event_split(ml, layers):
    info, batch = ml
    model = kunlun(info, num_layers=layers, event_split=False)
    assert attention_calls(model, batch) == {"history": 1}
    for layer in model.layers[:1]:  # the first layer of every stream runs the PFFN and pools
        assert all(b.pffn is not None and b.pool is not None for b in layer.blocks.values())


# ------------------------------------------------------------------------------- 3. the summary gate

def explicit_summary(m: NonSequenceSummary, x: torch.Tensor, form: str) -> torch.Tensor:
    def mlp(layers, z):
        return F.linear(F.gelu(F.linear(z, layers[0].weight, layers[0].bias)), layers[1].weight, layers[1].bias)

    z = mlp(m.mlp.layers, torch.einsum("tn,bnd->btd", m.lce.weight, x))
    if form == "interformer":  # σ(Z ⊙ MLP(Z))
        return torch.sigmoid(z * mlp(m.gate.mlp.layers, z))
    if form == "glu":  # Z ⊙ σ(W·Z + b)
        return z * torch.sigmoid(F.linear(z, m.gate.linear.weight, m.gate.linear.bias))
    return z


@pytest.mark.parametrize("form", ["interformer", "glu", "none"])
def test_summary_gate_forms_match_their_formulas(form):
    torch.manual_seed(0)
    m = NonSequenceSummary(5, 3, 8, form)
    x = torch.randn(4, 5, 8)
    torch.testing.assert_close(m(x), explicit_summary(m, x, form))
    assert m.flops() == m.lce.flops(8) + m.mlp.flops(3) + {"interformer": 2 * 3 * 2 * 64, "glu": 2 * 3 * 64, "none": 0}[form]


def test_summary_gate_default_is_the_design_note_form_and_switchable(ml):
    info, _ = ml
    assert kunlun(info).layers[0].summary.gate.form == "interformer"
    assert kunlun(info, summary_gate="glu").layers[0].summary.gate.form == "glu"
    torch.manual_seed(0)
    inter = build_model(model_from_dict({"name": "interformer"}), info)
    gates = [m.gate.form for m in inter.x_summary] + [m.gate.form for d in inter.s_summary for m in d.values()]
    assert set(gates) == {"interformer"}
    with pytest.raises(Exception, match="model.summary_gate"):
        kunlun(info, summary_gate="sigmoid")


# --------------------------------------------------------------- 4. what the Wukong experts mix

@pytest.mark.parametrize("source", ["summary", "tokens"])
def test_wukong_experts_mix_x_sum_or_the_tokens(ml, source):
    info, batch = ml
    model = kunlun(info, interaction_input=source)
    layer = model.layers[0]
    summ, h1 = capture([layer.summary])
    inter, h2 = capture([layer.interaction])
    layer_in, h3 = capture([layer], pre=True)
    with torch.no_grad():
        model(batch)
    for h in h1 + h2 + h3:
        h.remove()
    mixed = inter[0][1][0]
    n, t = info.n_tokens, SMALL["summary_tokens"]
    n_seq = sum(st.tokens for st in model.streams)
    if source == "summary":
        assert mixed.shape[1] == t + n_seq
        torch.testing.assert_close(mixed[:, :t], summ[0][2])  # X_sum = Gating(MLP(LCE(X)))
    else:
        assert mixed.shape[1] == n + n_seq
        torch.testing.assert_close(mixed[:, :n], layer_in[0][1][0])  # the layer's input tokens X
    assert inter[0][2].shape[1] == n  # either way: the next layer's N non-sequence tokens


def test_summary_input_needs_no_personalisation(ml):
    info, batch = ml
    model = kunlun(info, personalized=False, interaction_input="summary")
    layer = model.layers[0]
    assert layer.summary is not None and layer.static_kv is not None  # K/V static, X_sum still feeds the experts
    assert torch.isfinite(model(batch)).all()


# ------------------------------------------------------------------------- 5. the candidate token

def test_candidate_token_is_the_history_projection_of_its_own_features(ml):
    info, batch = ml
    torch.manual_seed(0)
    inputs = Inputs(info, 8, positions=True, time_buckets=16, candidates=True)
    ev, tables = inputs.events["history"], inputs.tables
    item, genre = info.cat_vocabs.index("item"), info.cat_vocabs.index("genre")
    cand = inputs.candidate_tokens(batch)["history"]
    parts = [tables["item"](batch.cat[:, item]), ev.candidate_event.expand(len(batch), -1), tables["genre"](batch.cat[:, genre])]
    torch.testing.assert_close(cand, ev.proj(torch.cat(parts, dim=-1)) + ev.time.weight[0])
    # one space: a history event with the candidate's item and genre, 0 s before the request, whose event type
    # embeds like the candidate marker, is exactly the candidate's token (position embeddings start at 0)
    with torch.no_grad():
        ev.candidate_event.copy_(tables["event"].weight[2])
    one = SequenceBatch(item=batch.cat[:, item : item + 1], event=torch.full((len(batch), 1), 2),
                        side=batch.cat[:, genre : genre + 1].unsqueeze(-1), gap=torch.zeros(len(batch), 1),
                        mask=torch.ones(len(batch), 1, dtype=torch.bool))
    torch.testing.assert_close(ev(tables, one)[:, 0], inputs.candidate_tokens(batch)["history"])


def test_candidate_side_feature_without_a_field_uses_the_oov_row():
    from kunlun.blocks.embeddings import EventTokens, SequenceInfo, embedding_tables

    seq = SequenceInfo("h", "item", "event", ("shop",), ("a", "b"))
    info = FeatureInfo(("user", "item"), {"user": 5, "item": 7, "event": 4, "shop": 6}, 0, (seq,), 3)
    torch.manual_seed(0)
    tables = embedding_tables(info, 4)
    ev = EventTokens(seq, 4, 4, 3, 0, False, info.cat_vocabs, candidate=True)
    cat = torch.tensor([[1, 3], [2, 5]])
    parts = [tables["item"](cat[:, 1]), ev.candidate_event.expand(2, -1), tables["shop"].weight[1].expand(2, -1)]
    torch.testing.assert_close(ev.candidate(tables, cat), ev.proj(torch.cat(parts, dim=-1)))


def test_kunlun_appends_the_projected_candidate_to_every_stream(ml):
    info, batch = ml
    model = kunlun(info)
    pffn = [b.pffn for b in model.layers[0].blocks.values()]
    calls, handles = capture(pffn)
    with torch.no_grad():
        model(batch)
        cand = model.inputs.candidate_tokens(batch)["history"]
    for h in handles:
        h.remove()
    assert len(calls) == len(model.streams) == 2
    for st, (_, args, _) in zip(model.streams, calls):
        expected = model.narrow[st.name](cand) if st.name in model.narrow else cand
        torch.testing.assert_close(args[0][:, -1], expected)
        assert args[2][:, -1].all()


# ------------------------------------------------------------------------------ 6. DIN and BST targets

def test_din_compares_history_and_candidate_tokens_of_one_space(ml):
    info, batch = ml
    torch.manual_seed(0)
    model = build_model(model_from_dict({"name": "din"}), info)
    model.eval()
    att = [m for m in model.modules() if isinstance(m, TargetAttention)]
    calls, handles = capture(att)
    with torch.no_grad():
        model(batch)
        _, seqs = model.inputs(batch)
        cand = model.inputs.candidate_tokens(batch)["history"]
    for h in handles:
        h.remove()
    history, target, _ = calls[0][1]
    torch.testing.assert_close(history, seqs["history"][0])
    torch.testing.assert_close(target, cand)


def test_bst_appends_the_projected_candidate(ml):
    info, batch = ml
    torch.manual_seed(0)
    model = build_model(model_from_dict({"name": "bst"}), info)
    model.eval()
    calls, handles = capture([model.blocks["history"][0]])
    with torch.no_grad():
        model(batch)
        cand = model.inputs.candidate_tokens(batch)["history"]
    for h in handles:
        h.remove()
    torch.testing.assert_close(calls[0][1][0][:, -1], cand)


# -------------------------------------------------------------------- 7. the same inputs for every model

@pytest.mark.parametrize("name,positions", [("kunlun", True), ("interformer", True), ("din", True), ("bst", False)])
def test_sequence_models_share_the_history_token_inputs(ml, name, positions):
    info, batch = ml
    torch.manual_seed(0)
    model = build_model(model_from_dict({"name": name}), info)
    model.eval()
    ev = model.inputs.events["history"]
    assert ev.n_parts == 3  # item, event type, genre
    assert ev.time is not None and ev.time_buckets == 16  # the time-gap feature
    assert (ev.position is not None) == positions  # BST: time-gap buckets are its positions (its paper)
    def later(s: SequenceBatch) -> SequenceBatch:
        return SequenceBatch(**{**vars(s), "gap": s.gap * 7 + 3600})

    moved = type(batch)(batch.label, batch.cat, batch.num, batch.group, {"history": later(batch.seqs["history"])},
                        {n: {c: later(w) for c, w in ws.items()} for n, ws in batch.windows.items()})
    with torch.no_grad():
        assert not torch.allclose(model(batch), model(moved))


def test_interformer_reads_time_gaps_through_rotary_attention_too(ml):
    info, batch = ml
    hist = batch.seqs["history"]
    # gaps scaled inside each log2-hour bucket would be fiddly; with the buckets off only rotary sees time
    moved = type(batch)(batch.label, batch.cat, batch.num, batch.group,
                        {"history": SequenceBatch(**{**vars(hist), "gap": hist.gap * 3})})
    out = {}
    for rotary in (True, False):
        torch.manual_seed(0)
        model = build_model(model_from_dict({"name": "interformer", "time_buckets": 0, "rotary_time": rotary}), info)
        model.eval()
        with torch.no_grad():
            out[rotary] = (model(batch), model(moved))
    assert not torch.allclose(*out[True])
    torch.testing.assert_close(*out[False])


# ------------------------------------------------------------ 8. every ablation variant builds and trains

QUALITY = Path(__file__).resolve().parents[1] / "src" / "kunlun" / "configs" / "quality.yaml"


def test_ablation_has_a_variant_for_every_new_switch():
    variants = yaml.safe_load(QUALITY.read_text())["ablation"]["variants"]
    flat = {o for overrides in variants.values() for o in overrides}
    for override in ["model.summary_gate=glu", "model.interaction_input=summary", "model.compskip_min_layers=1"]:
        assert override in flat


@pytest.mark.parametrize("variant", sorted(yaml.safe_load(QUALITY.read_text())["ablation"]["variants"]))
def test_every_ablation_variant_runs_a_training_step(ml, variant):
    info, batch = ml
    overrides = yaml.safe_load(QUALITY.read_text())["ablation"]["variants"][variant]
    raw = {"model": {"name": "kunlun", **SMALL}}
    for o in overrides:
        set_dotted(raw, o)
    torch.manual_seed(0)
    model = build_model(model_from_dict(raw["model"]), info)
    loss = F.binary_cross_entropy_with_logits(model(batch), batch.label.float())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["dnn", "dcnv2"])
def test_batch_norm_switch_puts_a_norm_after_every_hidden_layer(ml, name):
    """``model.batch_norm`` (the BARS DNN / DCNv2 setting): one BatchNorm1d per hidden layer of the deep tower,
    none by default, so the default model and its checkpoints keep their parameters."""
    info, batch = ml
    plain = build_model(model_from_dict({"name": name, "hidden": [8, 6]}), info)
    normed = build_model(model_from_dict({"name": name, "hidden": [8, 6], "batch_norm": True}), info)
    norms = [m.num_features for m in normed.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms == [8, 6]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.modules())
    assert set(normed.state_dict()) - set(plain.state_dict()) and set(plain.state_dict()) <= set(normed.state_dict())
    assert normed(batch).shape == (len(batch),)


@pytest.mark.parametrize("name", ["dnn", "dcnv2"])
def test_embedding_std_sets_the_initial_rows(ml, name):
    """``model.embedding_std``: the tables start N(0, σ²) (0.05 by default; FuxiCTR's 1e-4 for the BARS runs)."""
    info, _ = ml
    for std in (0.05, 1e-4):
        torch.manual_seed(0)
        model = build_model(model_from_dict({"name": name, "embedding_std": std}), info)
        rows = torch.cat([t.weight[1:].flatten() for t in model.inputs.tables.values()]).detach()
        assert rows.std().item() == pytest.approx(std, rel=0.05)
    from kunlun.errors import KunlunError
    with pytest.raises(KunlunError, match="model.embedding_std: expected > 0"):
        model_from_dict({"name": name, "embedding_std": 0})
