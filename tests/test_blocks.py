import pytest
import torch

from kunlun.blocks.attention import MultiHeadAttention
from kunlun.blocks.summary import SumKronLinear
from kunlun.blocks.wukong import WukongLayer
from kunlun.ops.attention import gdpa


def test_gdpa_matches_explicit_loops():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    mask = torch.rand(2, 6) > 0.3
    out = gdpa(q, k, v, "gelu", scale=0.5, key_mask=mask)
    ref = torch.zeros_like(out)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                for j in range(6):
                    if mask[b, j]:
                        w = torch.nn.functional.gelu(q[b, h, i] @ k[b, h, j]) * 0.5
                        ref[b, h, i] += w * v[b, h, j]
    torch.testing.assert_close(out, ref)


def test_attention_ignores_padding_and_empty_rows_are_zero():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2)
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out = attn(x, x, mask)
    x2 = x.clone()
    x2[0, 2:] = 100.0  # changing padded keys must not change the outputs of the real queries
    torch.testing.assert_close(attn(x2, x2, mask)[0, :2], out[0, :2])
    # a query that sees no key gets only the output bias
    torch.testing.assert_close(out[1], attn.o.bias.expand(4, 8))


def test_sum_kron_linear_is_sum_of_kronecker_terms():
    torch.manual_seed(0)
    layer = SumKronLinear(6, 3, 4, rank=2)
    x = torch.randn(5, 6, 4)
    expected = sum(layer.z[i].T @ x @ layer.w[i] for i in range(2))
    torch.testing.assert_close(layer(x), expected)
    dense_params = 6 * 3 * 4 * 4
    assert sum(p.numel() for p in layer.parameters()) < dense_params


def test_wukong_fm_block_is_pairwise_interactions():
    """The layer's own forward against explicit loops: FM[b, n, r] = Σ_m ⟨x_n, x_m⟩ · P[m, r] (pairwise dot
    products, projected), then flatten → LayerNorm → MLP → n_fmb tokens, next to the LCB tokens, plus the
    residual, then LayerNorm over D."""
    torch.manual_seed(0)
    n, n_fmb, n_lcb, d, r, hidden = 5, 2, 3, 4, 3, 8
    layer = WukongLayer(n_in=n, n_fmb=n_fmb, n_lcb=n_lcb, dim=d, rank=r, hidden=hidden)
    with torch.no_grad():  # non-trivial norm affines, so a skipped or misplaced norm shows
        for p in (*layer.fm_norm.parameters(), *layer.norm.parameters()):
            p.uniform_(0.5, 1.5)
    x = torch.randn(2, n, d, dtype=torch.float64)
    layer = layer.double()
    seen = {}
    layer.fm_norm.register_forward_pre_hook(lambda m, args: seen.setdefault("fm", args[0]))
    out = layer(x)

    def layer_norm(v, weight, bias, eps):
        return (v - v.mean()) / (v.var(unbiased=False) + eps).sqrt() * weight + bias

    fm = torch.zeros(2, n, r, dtype=torch.float64)
    ref = torch.zeros(2, n_fmb + n_lcb, d, dtype=torch.float64)
    w1, b1 = layer.fm_mlp.layers[0].weight, layer.fm_mlp.layers[0].bias
    w2, b2 = layer.fm_mlp.layers[1].weight, layer.fm_mlp.layers[1].bias
    for b in range(2):
        for i in range(n):
            for j in range(n):
                fm[b, i] += float(x[b, i] @ x[b, j]) * layer.proj[j]
        h = layer_norm(fm[b].flatten(), layer.fm_norm.weight, layer.fm_norm.bias, layer.fm_norm.eps)
        fmb = (w2 @ torch.relu(w1 @ h + b1) + b2).reshape(n_fmb, d)
        lcb = torch.stack([sum(layer.lcb.weight[t, m] * x[b, m] for m in range(n)) for t in range(n_lcb)])
        tokens = torch.cat([fmb, lcb]) + x[b]  # n_fmb + n_lcb = n: the residual is X itself
        for t in range(n_fmb + n_lcb):
            ref[b, t] = layer_norm(tokens[t], layer.norm.weight, layer.norm.bias, layer.norm.eps)
    assert seen["fm"].shape == (2, n * r)  # the FM block's flattened interactions, as the layer computed them
    torch.testing.assert_close(seen["fm"], fm.reshape(2, -1))
    torch.testing.assert_close(out, ref)
    assert WukongLayer(7, 2, 3, 4, 3, 8)(torch.randn(2, 7, 4)).shape == (2, 5, 4)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_rotary_scores_depend_only_on_time_differences(impl):
    from kunlun import ops
    from kunlun.ops.attention import rotary

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    tau = torch.tensor([[0.5, 2.0]])
    with ops.using(impl):
        q1, k1 = rotary(tau, 10.0, q, k)
        q2, k2 = rotary(tau + 3.7, 10.0, q, k)  # shift every time equally
    torch.testing.assert_close(q1 @ k1.transpose(-1, -2), q2 @ k2.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q1, q)


def test_gdpa_per_head_activations():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    out = gdpa(q, k, v, ["relu", "identity"], scale=1.0)
    torch.testing.assert_close(out[:, 0], torch.relu(q[:, 0] @ k[:, 0].transpose(-1, -2)) @ v[:, 0])
    torch.testing.assert_close(out[:, 1], (q[:, 1] @ k[:, 1].transpose(-1, -2)) @ v[:, 1])


def test_mixture_of_wukong_experts_partitions_tokens():
    from kunlun.blocks.wukong import MixtureOfWukongExperts

    torch.manual_seed(0)
    moe = MixtureOfWukongExperts(n_in=7, n_out=5, experts=2, dim=4, rank=2, hidden=8)
    assert moe.index == [[0, 2, 4, 6], [1, 3, 5]]
    x = torch.randn(3, 7, 4)
    y = moe(x)
    assert y.shape == (3, 5, 4)
    x2 = x.clone()
    x2[:, 1] += 1.0  # a token of expert 1 only changes expert 1's outputs (the last 2 tokens)
    y2 = moe(x2)
    torch.testing.assert_close(y2[:, :3], y[:, :3])
    assert not torch.allclose(y2[:, 3:], y[:, 3:])




def test_rms_norm_runs_in_float32_for_low_precision_inputs():
    from kunlun.blocks.common import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 8) * 30
    ref = torch.nn.RMSNorm(8)
    ref.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), ref(x))  # float32: exactly nn.RMSNorm
    y = norm(x.bfloat16())
    assert y.dtype is torch.bfloat16
    torch.testing.assert_close(y, ref(x.bfloat16().float()).bfloat16(), rtol=0, atol=0)  # float32 math, one rounding


def test_select_events_keeps_the_most_recent_of_one_type_left_padded():
    from kunlun.blocks.embeddings import select_events

    torch.manual_seed(0)
    b, length, d = 6, 9, 3
    tokens = torch.randn(b, length, d)
    mask = torch.rand(b, length) > 0.2
    event = torch.randint(2, 4, (b, length))
    gap = torch.rand(b, length)
    out, out_mask, out_gap = select_events(tokens, mask, event, code=3, length=4, extra=gap)
    for r in range(b):
        pos = [i for i in range(length) if mask[r, i] and event[r, i] == 3][-4:]
        k = len(pos)
        assert out_mask[r].tolist() == [False] * (4 - k) + [True] * k
        if k:
            torch.testing.assert_close(out[r, 4 - k :], tokens[r, pos])
            torch.testing.assert_close(out_gap[r, 4 - k :], gap[r, pos])
        assert (out[r, : 4 - k] == 0).all()


def test_mlp_batch_norm_is_linear_then_norm_then_activation_as_fuxictr():
    """``batch_norm``: each activated Linear's output is batch-normalised (batch statistics in training, running
    ones in eval) before the activation; the output layer is not; without it the MLP has no norms at all."""
    from kunlun.blocks.common import MLP

    torch.manual_seed(0)
    mlp = MLP([6, 5, 4, 1], dropout=0.0, batch_norm=True).double()
    with torch.no_grad():  # non-trivial affines, so a skipped or misplaced norm shows
        for bn in mlp.norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(32, 6, dtype=torch.float64) * 3 + 1

    def expected(x: torch.Tensor, training: bool) -> torch.Tensor:
        for layer, bn in zip(mlp.layers[:2], mlp.norms):
            h = layer(x)
            mean, var = (h.mean(0), h.var(0, unbiased=False)) if training else (bn.running_mean, bn.running_var)
            x = torch.relu((h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
        return mlp.layers[2](x)

    assert len(mlp.norms) == 2
    want = expected(x, training=True)  # before the forward: it updates the running statistics
    torch.testing.assert_close(mlp(x), want)
    mlp.eval()
    torch.testing.assert_close(mlp(x), expected(x, training=False))
    assert len(MLP([6, 5, 4], batch_norm=True, last_activation=True).norms) == 2  # the last layer is activated too
    assert MLP([6, 5, 1]).norms is None and not any(isinstance(m, torch.nn.BatchNorm1d) for m in MLP([6, 5, 1]).modules())
