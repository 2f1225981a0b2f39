"""Embedding tables and the two tokenisers: non-sequence fields → tokens, events → tokens."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from kunlun.blocks.common import linear_flops

# Downward, with the data flow: blocks read the batch types and the PAD/OOV ids of the data layer they
# embed; the data layer never imports a block (tests/test_imports.py).
from kunlun.data.batches import SequenceBatch
from kunlun.data.prepare import OOV, PAD


@dataclass(frozen=True)
class SequenceInfo:
    name: str
    item_vocab: str
    event_vocab: str | None
    side_vocabs: tuple[str, ...]
    event_names: tuple[str, ...] = ()  # raw event types; event type i has index i + 2 (after PAD, OOV)


@dataclass(frozen=True)
class FeatureInfo:
    """What a model needs to know about its inputs (from the prepared dataset and data config)."""

    cat_vocabs: tuple[str, ...]  # vocabulary of each categorical field, in column order
    vocab_sizes: dict[str, int]
    n_numeric: int
    sequences: tuple[SequenceInfo, ...]
    max_len: int

    @classmethod
    def from_encoder(cls, encoder, max_len: int) -> FeatureInfo:
        s = encoder.schema
        return cls(
            cat_vocabs=tuple(v for _, v in s.categorical),
            vocab_sizes={k: len(v) for k, v in encoder.vocabs.items()},
            n_numeric=len(s.numeric),
            sequences=tuple(
                SequenceInfo(q.name, q.item_vocab, q.event_vocab, tuple(v for _, v in q.side),
                             tuple(str(k) for k in encoder.vocabs[q.event_vocab].keys) if q.event_vocab else ())
                for q in s.sequences
            ),
            max_len=max_len,
        )

    @property
    def n_tokens(self) -> int:
        """Non-sequence tokens: one per categorical field, plus one for all numeric fields."""
        return len(self.cat_vocabs) + (1 if self.n_numeric else 0)


_PROBE = nn.ModuleDict()


@functools.cache
def table_key(vocab: str) -> str:
    """The module name of vocabulary ``vocab``'s table: the name itself (so checkpoints name their tables), unless
    PyTorch refuses it as a module name — it holds a '.', or is an attribute of a ModuleDict ('type', 'items',
    'train'), all fine column names — then a name derived from it."""
    if vocab and "." not in vocab and not hasattr(_PROBE, vocab):
        return vocab
    return "vocab_" + hashlib.sha256(vocab.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class EmbeddingTables(nn.ModuleDict):
    """A ModuleDict of embedding tables indexed by vocabulary name, whatever the name (see ``table_key``)."""

    def __getitem__(self, vocab: str) -> nn.Module:
        return super().__getitem__(table_key(vocab))

    def __setitem__(self, vocab: str, module: nn.Module) -> None:
        super().__setitem__(table_key(vocab), module)

    def __contains__(self, vocab: str) -> bool:
        return super().__contains__(table_key(vocab))


EMBEDDING_STD = 0.05  # initial N(0, σ²) of every embedding row (FuxiCTR, and so the BARS baselines, use 1e-4)


def embedding_tables(info: FeatureInfo, dim: int, vocabs: list[str] | None = None, std: float = EMBEDDING_STD) -> nn.ModuleDict:
    """One table per vocabulary (fields that share a vocabulary share a table), rows N(0, std²); row 0 is padding."""
    tables = EmbeddingTables()
    # sorted: initialisation order (and so the weights for a seed) must not depend on dict order
    for name in sorted(vocabs if vocabs is not None else info.vocab_sizes):
        emb = nn.Embedding(info.vocab_sizes[name], dim, padding_idx=PAD)
        nn.init.normal_(emb.weight, std=std)
        with torch.no_grad():
            emb.weight[PAD].zero_()
        tables[name] = emb
    return tables


class FeatureTokens(nn.Module):
    """Non-sequence tokens. cat: [B, F] long, num: [B, Dn] → [B, N, D] with N = F + (Dn > 0).

    The embedding tables are owned by the model and passed to ``forward`` (they are shared with the
    event tokens, and a module registered twice would be saved twice).
    """

    def __init__(self, info: FeatureInfo, dim: int):
        super().__init__()
        self.cat_vocabs = info.cat_vocabs
        self.dense = nn.Linear(info.n_numeric, dim) if info.n_numeric else None
        self.n_numeric = info.n_numeric
        self.dim = dim

    def forward(self, tables: nn.ModuleDict, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        tokens = [tables[v](cat[:, i]) for i, v in enumerate(self.cat_vocabs)]
        if self.dense is not None:
            tokens.append(self.dense(num))
        return torch.stack(tokens, dim=1)

    def flops(self) -> int:
        return linear_flops(1, self.n_numeric, self.dim) if self.dense is not None else 0


class EventTokens(nn.Module):
    """The history-token block shared by every sequence model (Kunlun, InterFormer, BST, DIN).

    History token = Linear(concat(item, event type, side embeddings)) + learned position embedding
    (``positions``; index counted from the newest slot) + time-gap bucket embedding (``time_buckets``;
    the gap in seconds before the request, bucketed on a log2-hours scale). SequenceBatch with L slots →
    [B, L, D], padding slots 0. The rotary encoding of log time gaps is a separate, attention-side use of
    the same gap (``time_positions``).

    ``candidate=True`` adds ``candidate``: the candidate item as a token of the *same* space — the same
    projection of its own item and side features (read from the non-sequence fields that share their
    vocabularies; a side feature with no such field takes its vocabulary's out-of-vocabulary row), a
    learned "candidate" event-type vector in the event slot, and the time-gap bucket of gap 0. It gets no
    position embedding (positions index the history; the event-type vector marks the candidate).
    """

    def __init__(self, seq: SequenceInfo, emb_dim: int, dim: int, max_len: int, time_buckets: int, positions: bool,
                 cat_vocabs: tuple[str, ...] = (), candidate: bool = False, embedding_std: float = EMBEDDING_STD):
        super().__init__()
        self.seq = seq
        self.n_parts = 1 + (1 if seq.event_vocab else 0) + len(seq.side_vocabs)
        self.in_dim = self.n_parts * emb_dim
        self.proj = nn.Linear(self.in_dim, dim)
        self.position = nn.Parameter(torch.zeros(max_len, dim)) if positions else None
        self.time_buckets = time_buckets
        self.time = nn.Embedding(time_buckets, dim) if time_buckets else None
        if self.time is not None:
            # like every embedding table: torch's default N(0, 1) made this one term ~13× the rest of an untrained
            # history token (item, event type, sides), burying the event type under time-bucket noise for the
            # first epochs (ml-100k, Kunlun seed 0: test NE 0.8106 → 0.7987 with this init)
            nn.init.normal_(self.time.weight, std=embedding_std)
        self.max_len = max_len
        self.dim = dim
        self.has_candidate = candidate
        # where the candidate's item and side features sit among the non-sequence fields (None: no such field)
        self.candidate_fields = tuple(cat_vocabs.index(v) if v in cat_vocabs else None
                                      for v in (seq.item_vocab, *seq.side_vocabs))
        self.candidate_event = None
        if candidate and seq.event_vocab:
            self.candidate_event = nn.Parameter(torch.randn(emb_dim) * 0.05)

    def forward(self, tables: nn.ModuleDict, s: SequenceBatch, zero_padding: bool = True) -> torch.Tensor:
        """``zero_padding=False``: padding slots keep what the projection gives them (for a caller that never
        reads them: one multiply fewer each way)."""
        parts = [tables[self.seq.item_vocab](s.item)]
        if self.seq.event_vocab:
            parts.append(tables[self.seq.event_vocab](s.event))
        parts += [tables[v](s.side[..., i]) for i, v in enumerate(self.seq.side_vocabs)]
        x = self.proj(torch.cat(parts, dim=-1))
        if self.position is not None:
            x = x + self.position[-x.shape[1] :]
        if self.time is not None:
            x = x + self.time(time_bucket(s.gap, self.time_buckets))
        return x * s.mask.unsqueeze(-1) if zero_padding else x

    def candidate(self, tables: nn.ModuleDict, cat: torch.Tensor) -> torch.Tensor:
        """The candidate item's token. cat: [B, F] long (the non-sequence fields) → [B, D]."""
        if not self.has_candidate:
            raise RuntimeError("EventTokens built without candidate=True")

        def field(index: int | None, vocab: str) -> torch.Tensor:
            ids = cat[:, index] if index is not None else cat.new_full((cat.shape[0],), OOV)
            return tables[vocab](ids)

        parts = [field(self.candidate_fields[0], self.seq.item_vocab)]
        if self.candidate_event is not None:
            parts.append(self.candidate_event.expand(cat.shape[0], -1))
        parts += [field(i, v) for i, v in zip(self.candidate_fields[1:], self.seq.side_vocabs)]
        x = self.proj(torch.cat(parts, dim=-1))
        # gap 0 → bucket 0, looked up (not weight[0]) so a sparse table gets a sparse gradient
        return x + self.time(cat.new_zeros(1)) if self.time is not None else x

    def flops(self, length: int | None = None) -> int:
        """Projection FLOPs over ``length`` events (default every padded slot, ``max_len``)."""
        return linear_flops(self.max_len if length is None else length, self.in_dim, self.dim)

    def candidate_flops(self) -> int:
        return linear_flops(1, self.in_dim, self.dim)


def time_bucket(gap: torch.Tensor, buckets: int) -> torch.Tensor:
    """Time gap in seconds → bucket floor(log2(1 + hours)), clamped to [0, buckets − 1]."""
    return torch.log2(1.0 + gap / 3600.0).floor().clamp(0, buckets - 1).long()


def time_positions(gap: torch.Tensor, time_scale: float) -> torch.Tensor:
    """Continuous rotary positions of events: τ = log(1 + Δt / time_scale). gap: [B, L] seconds → [B, L]."""
    return torch.log1p(gap / time_scale)


class Inputs(nn.Module):
    """Embeds a batch once for any model: non-sequence tokens and per-sequence event tokens.

    → x: [B, N, D]; seqs: name → (tokens [B, L, D], mask [B, L] bool, gap [B, L] seconds).
    One embedding table per vocabulary, shared by fields and sequences that use it. With
    ``candidates=True``, ``candidate_tokens`` gives each sequence's candidate token (see ``EventTokens``).
    """

    def __init__(self, info: FeatureInfo, dim: int, positions: bool = False, time_buckets: int = 0,
                 candidates: bool = False, embedding_std: float = EMBEDDING_STD):
        super().__init__()
        self.info = info
        self.tables = embedding_tables(info, dim, std=embedding_std)
        self.features = FeatureTokens(info, dim)
        self.events = nn.ModuleDict({
            q.name: EventTokens(q, dim, dim, info.max_len, time_buckets, positions, info.cat_vocabs, candidates, embedding_std)
            for q in info.sequences
        })
        self.candidates = candidates

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        x = self.features(self.tables, batch.cat, batch.num)
        seqs = {n: (self.events[n](self.tables, s), s.mask, s.gap) for n, s in batch.seqs.items() if n in self.events}
        return x, seqs

    def candidate_tokens(self, batch) -> dict[str, torch.Tensor]:
        """name → the candidate item's token [B, D] in that sequence's token space."""
        return {n: e.candidate(self.tables, batch.cat) for n, e in self.events.items()}

    def flops(self, lengths: dict[str, int] | None = None) -> int:
        """``lengths``: real events per sequence (default: every padded slot)."""
        f = self.features.flops() + sum(e.flops((lengths or {}).get(n)) for n, e in self.events.items())
        return f + (sum(e.candidate_flops() for e in self.events.values()) if self.candidates else 0)


def append_candidate(tokens: torch.Tensor, mask: torch.Tensor, gap: torch.Tensor, candidate: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidate as a sequence's newest slot, real and at time gap 0 (the sequence models' ``target_in_sequence``).
    tokens [B, L, D], mask [B, L] bool, gap [B, L], candidate [B, D] → tokens [B, L + 1, D], mask, gap [B, L + 1]."""
    return (torch.cat([tokens, candidate.unsqueeze(1)], dim=1), torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1),
            torch.cat([gap, torch.zeros_like(gap[:, :1])], dim=1))


def masked_mean(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens. s: [B, L, D], mask: [B, L] → [B, D] (0 for an empty sequence)."""
    m = mask.unsqueeze(-1).to(s.dtype)
    return (s * m).sum(1) / m.sum(1).clamp(min=1.0)
def select_events(tokens: torch.Tensor, mask: torch.Tensor, event: torch.Tensor, code: int, length: int,
                  extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The ``length`` most recent events of type ``code``, compacted and left-padded (newest last).

    tokens: [B, L, D], mask/event/extra: [B, L] → tokens [B, length, D], mask [B, length], extra [B, length].
    A gather, so gradients flow to the selected tokens only.
    """
    b, seq_len, d = tokens.shape
    sel = mask & (event == code)
    rank = sel.flip(1).cumsum(1).flip(1)  # 1 = the most recent selected event
    keep = sel & (rank <= length)
    slot = torch.where(keep, length - rank, torch.full_like(rank, length))  # slot `length` is a discard bin
    src = torch.full((b, length + 1), seq_len, dtype=torch.long, device=tokens.device)
    src.scatter_(1, slot, torch.arange(seq_len, device=tokens.device).expand(b, seq_len))
    src = src[:, :length]  # index seq_len points at the zero row appended below
    padded = torch.cat([tokens, tokens.new_zeros(b, 1, d)], dim=1)
    out = torch.gather(padded, 1, src.unsqueeze(-1).expand(-1, -1, d))
    out_extra = None
    if extra is not None:
        out_extra = torch.gather(torch.cat([extra, extra.new_zeros(b, 1)], dim=1), 1, src)
    return out, src < seq_len, out_extra
