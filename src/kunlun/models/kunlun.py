"""Kunlun (Meta, "Kunlun: Establishing Scaling Laws for Massive-Scale Recommendation Systems through
Unified Architecture Design", arXiv 2602.10016, 2026).

Per layer, for every behaviour sequence:
  Transformer block: GDPA-PFFN (Q = sequence, K/V = personalised non-sequence summary, one activation
                     per head) then multi-head self-attention over the sequence (sliding window,
                     rotary encoding of log time gaps).
  Interaction block: hierarchical seed pooling (PMA + SumKronLinear) summarises the sequence; a
                     Mixture of Wukong Experts interacts the N non-sequence tokens with those summaries
                     and returns the next layer's N non-sequence tokens. (The design note has the
                     experts mix X_sum instead: ``interaction_input=summary``. Our default keeps the
                     tokens, as InterFormer's Interaction Arch does: with X_sum the model trained to a
                     higher loss and a worse validation NE — the T gated summary tokens are a
                     bottleneck; docs/models.md#choices-beyond-the-paper has the measurement and its command.)
X_sum = Gating(MLP(LCE(X))) with InterFormer's Gating(Z) = σ(Z ⊙ MLP(Z)) (``summary_gate=interformer``;
``glu``: Z ⊙ σ(W·Z); ``none``).
CompSkip alternates the work within each stream: its even layers run GDPA-PFFN + a fresh summary and
skip self-attention; its odd layers run self-attention and reuse the previous summary (a final summary
is pooled after a stream's last layer when it is an odd one, so its attention output is not wasted). A
stream shallower than ``compskip_min_layers`` (default 2) has no pair of layers to alternate over, so
each of its layers runs the whole block (PFFN, self-attention, pooling): every stream runs
self-attention at least once — a 1-layer Kunlun, and the 1-layer light stream of the default 2-layer
model. (``compskip_min_layers=1`` applies the alternation to every stream: a 1-layer stream then never
runs self-attention.)
Output: MLP over the last non-sequence tokens and sequence summaries → one logit.
Datasets without sequences run the non-sequence path only (stacked Wukong experts over the tokens).

The forward pass reads as named stages, each a small module whose docstring gives its shapes (``Kunlun``
lists them): ``StreamWindows`` (each stream's events: carved from the merged window or its own window) →
``CandidateInsertion`` (the candidate as the newest slot) → ``narrow`` (a light stream's width) →
``TimePositions`` (τ) → ``KunlunLayer`` × num_layers → ``output``. A stream travels between stages as a
``StreamWindow`` (tokens, mask, time gaps) and then a ``StreamState`` (tokens, mask, τ); ``token_counts`` and
FLOPs are keyed by the stage whose tokens they count (``TokenKey``).

Event-level personalisation (``event_split``, off by default: see ``KunlunConfig``): a sequence with event types is
split into one stream per type; types in
``primary_events`` keep the full configuration, the others get a light one (``light_scale`` × width,
heads, summary tokens, seeds, window, length and depth), so cheap events cost less. Light streams are
projected to their own width and their summaries back to ``d_model`` for the interaction. What a stream holds
(``stream_window``): ``merged`` (default) — its type's events among the sequence's ``max_seq_len`` most recent
events, carved from the merged window (so a stream is mostly padding: a type that is a third of the events
fills a third of its slots); ``own`` — its type's own most recent events, a per-type window built by the data
layer (``Batcher(event_windows=model.event_windows)``: the windows a model needs). ``own`` fills the streams
but measured worse than ``merged`` on ml-latest-small (docs/models.md#event-type-streams: the numbers and their commits): with the
architecture as it is, older events of one type hurt more than the padding costs.

Every component is on by default and switchable in the config (an ablation is a config change):
``window`` (0 = full attention), ``rotary_time`` (and ``rotary_base``, ``time_scale``),
``gdpa_activation`` (one name = same for all heads), ``seq_pooling`` (hsp | pma), ``personalized``
(False = static learned K/V), ``summary_gate``, ``wukong_experts`` (1 = a single Wukong layer),
``interaction_input``, ``compskip`` (and ``compskip_min_layers``), ``event_split``, ``target_in_sequence``.

Choices the paper leaves open, made here: one token width ``d_model`` everywhere; the candidate item
is a non-sequence token (conditioning the sequence through the summary K/V) and, with
``target_in_sequence``, also the newest token of every stream (target-aware attention and pooling),
built by the history-token block from its own item and side features with a "candidate" event type
and time gap 0, so it lives in the history tokens' space (``EventTokens.candidate``); several sequences
get their own blocks and concatenate their summaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from kunlun.blocks.attention import SequenceSelfAttention
from kunlun.blocks.common import MLP, linear_flops
from kunlun.blocks.embeddings import FeatureInfo, Inputs, append_candidate, select_events, time_positions
from kunlun.blocks.pffn import GDPAPFFN
from kunlun.blocks.summary import HierarchicalSeedPooling, NonSequenceSummary, SeedPooling
from kunlun.blocks.wukong import MixtureOfWukongExperts
from kunlun.data.batches import Batch, SequenceBatch
from kunlun.errors import KunlunError
from kunlun.model_configs import KunlunConfig
from kunlun.models.base import RankingModel, register


@dataclass(frozen=True)
class Stream:
    """One sequence stream: a whole behaviour sequence, or one event type of it."""

    name: str  # module key, e.g. "history" or "history_liked"
    source: str  # the batch's sequence
    event_code: int | None  # event-type index to keep; None = every event
    dim: int
    heads: int
    window: int
    tokens: int  # summary tokens
    seeds: int
    length: int
    layers: int  # the stream takes part in layers [0, layers)


def make_streams(cfg: KunlunConfig, info: FeatureInfo) -> list[Stream]:
    streams = []
    for q in info.sequences:
        if not (cfg.event_split and q.event_names):
            streams.append(Stream(q.name, q.name, None, cfg.d_model, cfg.num_heads, cfg.window, cfg.seq_summary_tokens,
                                  cfg.num_seeds, info.max_len, cfg.num_layers))
            continue
        any_primary = any(e in cfg.primary_events for e in q.event_names)
        for i, event in enumerate(q.event_names):
            name = f"{q.name}_{event}".replace(".", "_")
            if event in cfg.primary_events or not any_primary:
                streams.append(Stream(name, q.name, i + 2, cfg.d_model, cfg.num_heads, cfg.window, cfg.seq_summary_tokens,
                                      cfg.num_seeds, info.max_len, cfg.num_layers))
                continue
            k = cfg.light_scale
            heads = max(1, round(cfg.num_heads * k))
            unit = 2 * heads  # even head width (rotary)
            streams.append(Stream(
                name, q.name, i + 2, dim=max(unit, int(cfg.d_model * k) // unit * unit), heads=heads,
                window=round(cfg.window * k), tokens=max(1, round(cfg.seq_summary_tokens * k)),
                seeds=max(1, round(cfg.num_seeds * k)), length=max(1, round(info.max_len * k)),
                layers=max(1, math.ceil(cfg.num_layers * k)),
            ))
    return streams


def layer_plan(cfg: KunlunConfig, index: int, depth: int) -> tuple[bool, bool, bool]:
    """(run GDPA-PFFN, run self-attention, pool a fresh summary) in layer ``index`` for a stream that
    takes part in layers [0, depth). CompSkip alternates within the stream; a stream shallower than
    ``compskip_min_layers`` runs everything in each of its layers."""
    if index >= depth:
        return False, False, False
    if not cfg.compskip or depth < cfg.compskip_min_layers:
        return True, True, True
    even = index % 2 == 0
    return even, not even, even


def head_activations(cfg: KunlunConfig, heads: int) -> str | list[str]:
    acts = cfg.gdpa_activation
    return acts[0] if len(acts) == 1 else [acts[h % len(acts)] for h in range(heads)]


class StreamBlocks(nn.Module):
    """One stream's work in one layer. s: [B, L, d], mask [B, L], tau [B, L] | None, x_sum: [B, T, D]
    → (s', summary [B, tokens, D] or None when the layer reuses the previous summary)."""

    def __init__(self, cfg: KunlunConfig, st: Stream, index: int):
        super().__init__()
        self.st, self.cfg = st, cfg
        self.use_pffn, self.use_attn, self.use_pool = layer_plan(cfg, index, st.layers)
        # an attention-only last layer pools once more after the interaction, so its work reaches the output
        self.final_pool = index == st.layers - 1 and self.use_attn and not self.use_pool
        # padding slots are never read (see StreamWindows): left unmasked
        self.pffn = (GDPAPFFN(st.dim, st.heads, head_activations(cfg, st.heads), kv_dim=cfg.d_model, zero_padding=False)
                     if self.use_pffn else None)
        self.attn = (SequenceSelfAttention(st.dim, st.heads, st.window, cfg.rotary_base, zero_padding=False)
                     if self.use_attn else None)
        if self.use_pool or self.final_pool:
            self.pool = (SeedPooling(st.dim, st.heads, st.tokens) if cfg.seq_pooling == "pma"
                         else HierarchicalSeedPooling(st.dim, st.heads, st.seeds, st.tokens, cfg.kron_rank))
            self.widen = nn.Linear(st.dim, cfg.d_model) if st.dim != cfg.d_model else None
        else:
            self.pool = None

    def transform(self, s: torch.Tensor, mask: torch.Tensor, tau: torch.Tensor | None, x_sum: torch.Tensor | None) -> torch.Tensor:
        if self.pffn is not None:
            s = self.pffn(s, x_sum, mask)
        if self.attn is not None:
            s = self.attn(s, mask, tau)
        return s

    def summarise(self, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.pool(s, mask)
        return self.widen(z) if self.widen is not None else z

    def flops(self, length: int | None = None) -> dict[str, int]:
        """FLOPs over ``length`` tokens of this stream (default: every padded slot)."""
        st, out = self.st, {}
        length = st.length if length is None else length
        if self.pffn is not None:
            out["gdpa_pffn"] = self.pffn.flops(length, self.cfg.summary_tokens)
        if self.attn is not None:
            out["self_attention"] = self.attn.attn.flops(length, length)
        if self.pool is not None:
            out["seed_pooling"] = self.pool.flops(length) + (linear_flops(st.tokens, st.dim, self.cfg.d_model) if self.widen else 0)
        return out


# ------------------------------------------------------------------------------ stream state between stages


class TokenKey(NamedTuple):
    """A key of ``Kunlun.token_counts`` and of the ``lengths`` ``Kunlun.flops_by_component`` reads: the real
    tokens one stage works on, per example.

    ``TokenKey.window(sequence)``: the real events of a sequence's merged window, embedded once for every
    stream that reads or carves it (``StreamWindows``). ``TokenKey.stream(name)``: a stream's real tokens in the
    layers: its events, capped at its length, plus the candidate slot (``CandidateInsertion``). A tuple of
    strings, so keys hash and sort (``RankingModel.useful_flops_per_example`` sorts them).
    """

    stage: str  # "window" | "stream"
    name: str  # the sequence (window) or the stream (stream)

    @classmethod
    def window(cls, sequence: str) -> TokenKey:
        return cls("window", sequence)

    @classmethod
    def stream(cls, name: str) -> TokenKey:
        return cls("stream", name)


@dataclass(frozen=True)
class StreamWindow:
    """A stream's events before the layers: tokens [B, K, D], mask [B, K] (True = a real event), gap [B, K]
    (seconds before the request)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    gap: torch.Tensor


@dataclass(frozen=True)
class StreamState:
    """A stream in the layers: tokens [B, L, d] (d = the stream's width), mask [B, L] (True = a real event or
    the candidate), tau [B, L] (rotary time positions τ = log(1 + Δt / time_scale)) or None (``rotary_time=False``)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    tau: torch.Tensor | None


# --------------------------------------------------------------------- stages before the layers (no parameters)
# The stages below hold no parameters: the embedding tables and history-token blocks they use are the model's
# ``inputs`` (shared with the non-sequence side), passed in, so every parameter keeps its checkpoint name.


class StreamWindows(nn.Module):
    """Per-stream windowing. batch → stream name → StreamWindow(tokens [B, K, D], mask [B, K], gap [B, K]).

    A whole-sequence stream reads its sequence's merged window (K = the batch's window length). An event-type
    stream holds its type's K = ``keep`` most recent events (its length less the candidate slot), newest last:
    carved from the merged window by ``select_events`` (``stream_window=merged``), or its type's own window
    from the batch (``own``, ``own_window``). A merged window is embedded once, through ``inputs``, for all the
    streams that read it; an own window is embedded for its stream.

    A stream's padding slots are never read by a real slot: the ops that mix slots (self-attention, seed
    pooling) mask their keys, and the others (projections, norms, GDPA-PFFN) work slot by slot. So they are not
    zeroed on the way (their values, finite, reach no output and get zero gradients): a step of this size is
    bound by operator count, and each mask costs a multiply each way.
    """

    def __init__(self, streams: list[Stream], own: bool, target_in_sequence: bool):
        super().__init__()
        self.streams = streams
        self.own = own  # stream_window=own: event-type streams read the batch's per-type windows
        self.target = int(target_in_sequence)
        self.keep = {st.name: st.length - self.target for st in streams}

    def reads_own(self, st: Stream) -> bool:
        return st.event_code is not None and self.own

    def own_window(self, batch: Batch, st: Stream) -> SequenceBatch:
        """``stream_window=own``: the stream's event type's own window (built by the data layer,
        ``Batcher(event_windows=model.event_windows)``), cut to the stream's length (candidate slot excluded)."""
        if st.source not in batch.windows:
            raise KunlunError(f"Kunlun reads {st.source!r} through per-event-type windows (model.stream_window=own) and this "
                              "batch has none: build batches with Batcher(..., event_windows=model.event_windows)")
        keep = self.keep[st.name]
        w = batch.windows[st.source].get(st.event_code)
        if w is None:  # a batch built with every type of the data (event_windows=True), and this one has no events
            b, side = len(batch), batch.seqs[st.source].side.shape[-1]
            zeros = batch.cat.new_zeros((b, keep))
            return SequenceBatch(zeros, zeros, batch.cat.new_zeros((b, keep, side)), batch.num.new_zeros((b, keep)), zeros.bool())
        return SequenceBatch(w.item[:, -keep:], w.event[:, -keep:], w.side[:, -keep:], w.gap[:, -keep:], w.mask[:, -keep:])

    def forward(self, batch: Batch, inputs: Inputs) -> dict[str, StreamWindow]:
        merged: dict[str, StreamWindow] = {}  # each sequence's merged window, embedded once
        out = {}
        for st in self.streams:
            if self.reads_own(st):
                sb = self.own_window(batch, st)
                out[st.name] = StreamWindow(inputs.events[st.source](inputs.tables, sb, zero_padding=False), sb.mask, sb.gap)
                continue
            if st.source not in merged:
                sq = batch.seqs[st.source]
                merged[st.source] = StreamWindow(inputs.events[st.source](inputs.tables, sq, zero_padding=False), sq.mask, sq.gap)
            w = merged[st.source]
            if st.event_code is not None:  # this type's events among the merged window's, compacted
                w = StreamWindow(*select_events(w.tokens, w.mask, batch.seqs[st.source].event, st.event_code,
                                                self.keep[st.name], w.gap))
            out[st.name] = w
        return out

    def real_events(self, batch: Batch) -> dict[TokenKey, torch.Tensor]:
        """[B] real events of each merged window embedded (``TokenKey.window``) and of each stream's window
        (``TokenKey.stream``, the candidate slot not counted)."""
        out = {}
        for st in self.streams:
            sq = batch.seqs[st.source]
            if st.event_code is None:
                out[TokenKey.stream(st.name)] = sq.mask.sum(1)
            elif self.own:
                out[TokenKey.stream(st.name)] = self.own_window(batch, st).mask.sum(1)
            else:
                out[TokenKey.stream(st.name)] = (sq.mask & (sq.event == st.event_code)).sum(1).clamp(max=self.keep[st.name])
            if not self.reads_own(st):
                out[TokenKey.window(st.source)] = sq.mask.sum(1)
        return out

    def flops(self, inputs: Inputs, lengths: dict[TokenKey, int]) -> int:
        """Embedding FLOPs of the windows read: merged windows once each, own windows per stream. ``lengths``:
        real tokens per ``TokenKey`` (a stream's count includes its candidate slot); a missing key: every slot."""
        merged = {st.source for st in self.streams if not self.reads_own(st)}
        f = sum(inputs.events[src].flops(lengths.get(TokenKey.window(src))) for src in merged)
        return f + sum(inputs.events[st.source].flops(lengths.get(TokenKey.stream(st.name), st.length) - self.target)
                       for st in self.streams if self.reads_own(st))


class CandidateInsertion(nn.Module):
    """Target-aware streams (``target_in_sequence``): each stream's window gets its sequence's candidate token as
    the newest slot, real and at time gap 0, so self-attention and pooling see the candidate.

    windows: stream → StreamWindow [B, K, D]; candidates: sequence → [B, D] (``Inputs.candidate_tokens``)
    → stream → StreamWindow [B, K + 1, D].
    """

    def __init__(self, streams: list[Stream]):
        super().__init__()
        self.source = {st.name: st.source for st in streams}

    def forward(self, windows: dict[str, StreamWindow], candidates: dict[str, torch.Tensor]) -> dict[str, StreamWindow]:
        out = {}
        for name, w in windows.items():
            out[name] = StreamWindow(*append_candidate(w.tokens, w.mask, w.gap, candidates[self.source[name]]))
        return out

    def flops(self, inputs: Inputs) -> int:
        """The candidate tokens' FLOPs (one per sequence, through its history-token block)."""
        return sum(e.candidate_flops() for e in inputs.events.values())


class TimePositions(nn.Module):
    """τ, the rotary time positions: stream → StreamWindow (tokens [B, L, d], mask [B, L], gap [B, L])
    → stream → StreamState(tokens, mask, tau [B, L] = log(1 + gap / time_scale)); tau None when
    ``time_scale`` is None (``rotary_time=False``)."""

    def __init__(self, time_scale: float | None):
        super().__init__()
        self.time_scale = time_scale

    def forward(self, windows: dict[str, StreamWindow]) -> dict[str, StreamState]:
        return {name: StreamState(w.tokens, w.mask, time_positions(w.gap, self.time_scale) if self.time_scale is not None else None)
                for name, w in windows.items()}


# ------------------------------------------------------------------------------------------------ the layers


class KunlunLayer(nn.Module):
    """x: [B, N, D]; states: stream → StreamState (tokens [B, L_s, d_s], mask [B, L_s], tau [B, L_s] | None);
    summaries: stream → [B, T_s, D] (the previous layer's, reused where a stream skips pooling)
    → (x', states', summaries').

    The Mixture of Wukong Experts mixes [X, sequence summaries] (``interaction_input=tokens``) or
    [X_sum, sequence summaries] (``summary``, the design note's form) into the next layer's N tokens;
    without sequences it always mixes the tokens (there is no sequence side for a summary to serve).
    """

    def __init__(self, cfg: KunlunConfig, index: int, n_tokens: int, streams: list[Stream], n_experts: int):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.blocks = nn.ModuleDict({st.name: StreamBlocks(cfg, st, index) for st in streams})
        needs_kv = any(b.use_pffn for b in self.blocks.values())
        self.mix_summary = bool(streams) and cfg.interaction_input == "summary"
        self.summary = self.static_kv = None
        if (needs_kv and cfg.personalized) or self.mix_summary:
            self.summary = NonSequenceSummary(n_tokens, cfg.summary_tokens, d, cfg.summary_gate)
        if needs_kv and not cfg.personalized:
            self.static_kv = nn.Parameter(torch.randn(cfg.summary_tokens, d) * 0.05)
        n_in = (cfg.summary_tokens if self.mix_summary else n_tokens) + sum(st.tokens for st in streams)
        self.interaction = MixtureOfWukongExperts(n_in, n_tokens, min(n_experts, n_in, n_tokens), d, cfg.fm_rank,
                                                  cfg.fm_hidden, cfg.dropout)

    def forward(self, x: torch.Tensor, states: dict[str, StreamState], summaries: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, StreamState], dict[str, torch.Tensor]]:
        x_sum = self.summary(x) if self.summary is not None else None
        kv = self.static_kv.expand(x.shape[0], -1, -1) if self.static_kv is not None else x_sum
        new_states, new_sums = {}, dict(summaries)
        for name, block in self.blocks.items():
            state = states[name]
            state = new_states[name] = StreamState(block.transform(state.tokens, state.mask, state.tau, kv), state.mask, state.tau)
            if block.use_pool:
                new_sums[name] = block.summarise(state.tokens, state.mask)
        x = self.interaction(torch.cat([x_sum if self.mix_summary else x, *new_sums.values()], dim=1))
        for name, block in self.blocks.items():
            if block.final_pool:
                new_sums[name] = block.summarise(new_states[name].tokens, new_states[name].mask)
        return x, new_states, new_sums

    def flops(self, lengths: dict[TokenKey, int] | None = None) -> dict[str, int]:
        """``lengths``: real tokens per ``TokenKey`` (this layer reads the ``TokenKey.stream`` ones; default:
        every padded slot)."""
        out = {"interaction": self.interaction.flops()}
        if self.summary is not None:
            out["nonseq_summary"] = self.summary.flops()
        for name, block in self.blocks.items():
            for k, v in block.flops((lengths or {}).get(TokenKey.stream(name))).items():
                out[k] = out.get(k, 0) + v
        return out


# ------------------------------------------------------------------------------------------------ the model


@register(KunlunConfig)
class Kunlun(RankingModel):
    """Batch → logits [B], as named stages (the module docstring has the architecture):

    1. ``inputs.features``: the non-sequence fields → x [B, N, D].
    2. ``windows`` (StreamWindows): batch → stream → StreamWindow [B, K_s, D], each stream's events.
    3. ``insert_candidate`` (CandidateInsertion, with ``target_in_sequence``; else None): the candidate token
       (``inputs.candidate_tokens``) appended → [B, K_s + 1, D].
    4. ``narrow``: a light stream's tokens to its own width d_s (nn.Linear per stream narrower than D).
    5. ``positions`` (TimePositions): time gaps → τ → stream → StreamState(tokens [B, L_s, d_s], mask [B, L_s],
       tau [B, L_s] | None).
    6. ``layers`` (KunlunLayer × num_layers): (x, states, summaries) → (x', states', summaries'), summaries:
       stream → [B, T_s, D].
    7. ``output`` (MLP): [x, every stream's last summary] flattened, [B, (N + Σ T_s)·D] → logits [B].

    Stages 2, 3 and 5 hold no parameters; the parameters keep the names they had before the stages were
    named (``inputs``, ``narrow``, ``layers``, ``output``), so older checkpoints load.
    """

    def __init__(self, cfg: KunlunConfig, info: FeatureInfo):
        super().__init__()
        self.config, self.info = cfg, info
        d = cfg.d_model
        self.inputs = Inputs(info, d, cfg.position_embedding, cfg.time_buckets, candidates=cfg.target_in_sequence)
        self.streams = make_streams(cfg, info)
        if cfg.target_in_sequence:
            self.streams = [replace(st, length=st.length + 1) for st in self.streams]
        # stream_window=own: batches must carry the windows of the streams' event types (Batcher(event_windows=...))
        self.event_windows: dict[str, tuple[int, ...]] = {}
        if cfg.stream_window == "own":
            for st in self.streams:
                if st.event_code is not None:
                    self.event_windows[st.source] = tuple(sorted({*self.event_windows.get(st.source, ()), st.event_code}))
        self.windows = StreamWindows(self.streams, bool(self.event_windows), cfg.target_in_sequence)
        self.insert_candidate = CandidateInsertion(self.streams) if cfg.target_in_sequence else None
        self.positions = TimePositions(cfg.time_scale if cfg.rotary_time else None)
        self.narrow = nn.ModuleDict({st.name: nn.Linear(d, st.dim) for st in self.streams if st.dim != d})
        n = info.n_tokens
        experts = min(cfg.wukong_experts, n)
        self.layers = nn.ModuleList(KunlunLayer(cfg, i, n, self.streams, experts) for i in range(cfg.num_layers))
        out_in = (n + sum(st.tokens for st in self.streams)) * d
        self.output = MLP([out_in, *cfg.output_hidden, 1], act="relu", dropout=cfg.dropout)

    def config_notes(self) -> list[str]:
        """``event_split`` on a sequence whose event types it cannot tell apart: no types (nothing is split), or none
        named in ``primary_events`` (every type gets a full-size stream, the most expensive layout)."""
        if not self.config.event_split:
            return []
        notes = []
        for q in self.info.sequences:
            if not q.event_names:
                notes.append(f"model.event_split=true: sequence {q.name!r} has no event types, so it stays one stream")
            elif not any(e in self.config.primary_events for e in q.event_names):
                notes.append(f"model.event_split=true: none of sequence {q.name!r}'s event types ({', '.join(q.event_names)}) "
                             f"is in model.primary_events ({', '.join(self.config.primary_events) or 'none'}), so every type "
                             f"gets a full-size stream; name the valuable ones, e.g. model.primary_events=[{q.event_names[0]}]")
        return notes

    def own_window(self, batch: Batch, st: Stream) -> SequenceBatch:
        """``stream_window=own``: the stream's own window (``StreamWindows.own_window``)."""
        return self.windows.own_window(batch, st)

    def forward(self, batch: Batch) -> torch.Tensor:
        inputs = self.inputs
        x = inputs.features(inputs.tables, batch.cat, batch.num)  # [B, N, D]
        candidates = inputs.candidate_tokens(batch) if self.insert_candidate is not None else {}  # sequence → [B, D]
        windows = self.windows(batch, inputs)  # stream → [B, K_s, D]
        if self.insert_candidate is not None:
            windows = self.insert_candidate(windows, candidates)  # → [B, K_s + 1, D]
        windows = {name: StreamWindow(self.narrow[name](w.tokens), w.mask, w.gap) if name in self.narrow else w
                   for name, w in windows.items()}  # → [B, L_s, d_s]
        states = self.positions(windows)  # stream → StreamState
        summaries: dict[str, torch.Tensor] = {}  # stream → [B, T_s, D]
        for layer in self.layers:
            x, states, summaries = layer(x, states, summaries)
        flat = torch.cat([x.flatten(1), *(summaries[st.name].flatten(1) for st in self.streams)], dim=1)
        return self.output(flat).squeeze(-1)

    def token_counts(self, batch: Batch) -> dict[TokenKey, torch.Tensor]:
        """[B] real tokens per ``TokenKey``: each stream's in the layers (its events, capped at its length, plus the
        candidate slot) and each merged window's embedded for the streams carved from it."""
        target = int(self.config.target_in_sequence)
        return {k: v + target if k.stage == "stream" else v for k, v in self.windows.real_events(batch).items()}

    def flops_by_component(self, lengths: dict[TokenKey, int] | None = None) -> dict[str, int]:
        """``lengths``: real tokens per key of ``token_counts`` (useful FLOPs); None: every slot (executed)."""
        d = self.config.d_model
        lengths = lengths or {}
        unknown = [k for k in lengths if not isinstance(k, TokenKey)]
        if unknown:  # e.g. an old-style "stream:<name>" string: it would silently count every slot
            raise ValueError(f"lengths keys must be TokenKeys (Kunlun.token_counts), got {unknown[0]!r}")
        inputs = self.inputs
        tokens = inputs.features.flops() + self.windows.flops(inputs, lengths)
        if self.insert_candidate is not None:
            tokens += self.insert_candidate.flops(inputs)
        tokens += sum(linear_flops(lengths.get(TokenKey.stream(st.name), st.length), d, st.dim)
                      for st in self.streams if st.name in self.narrow)
        total = {"tokens": tokens}
        for layer in self.layers:
            for k, v in layer.flops(lengths).items():
                total[k] = total.get(k, 0) + v
        total["output"] = self.output.flops()
        return total
