"""Embedding tables and the two tokenisers: non-sequence fields → tokens, events → tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kunlun.blocks.common import linear_flops
from kunlun.data.batches import SequenceBatch
from kunlun.data.prepare import PAD


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


def embedding_tables(info: FeatureInfo, dim: int, vocabs: list[str] | None = None) -> nn.ModuleDict:
    """One table per vocabulary (fields that share a vocabulary share a table); row 0 is padding."""
    tables = nn.ModuleDict()
    # sorted: initialisation order (and so the weights for a seed) must not depend on dict order
    for name in sorted(vocabs if vocabs is not None else info.vocab_sizes):
        emb = nn.Embedding(info.vocab_sizes[name], dim, padding_idx=PAD)
        nn.init.normal_(emb.weight, std=0.05)
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
    """Event tokens of one sequence: concat(item, event type, side embeddings) → Linear → + position
    embedding + time-gap bucket embedding. SequenceBatch with L slots → [B, L, D].

    The time gap (seconds before the request) is bucketed on a log2-hours scale; a plain, cheap temporal
    signal (the rotary encoding of log gaps is a separate block).
    """

    def __init__(self, seq: SequenceInfo, emb_dim: int, dim: int, max_len: int, time_buckets: int, positions: bool):
        super().__init__()
        self.seq = seq
        self.n_parts = 1 + (1 if seq.event_vocab else 0) + len(seq.side_vocabs)
        self.in_dim = self.n_parts * emb_dim
        self.proj = nn.Linear(self.in_dim, dim)
        self.position = nn.Parameter(torch.zeros(max_len, dim)) if positions else None
        self.time_buckets = time_buckets
        self.time = nn.Embedding(time_buckets, dim) if time_buckets else None
        self.max_len = max_len
        self.dim = dim

    def forward(self, tables: nn.ModuleDict, s: SequenceBatch) -> torch.Tensor:
        parts = [tables[self.seq.item_vocab](s.item)]
        if self.seq.event_vocab:
            parts.append(tables[self.seq.event_vocab](s.event))
        parts += [tables[v](s.side[..., i]) for i, v in enumerate(self.seq.side_vocabs)]
        x = self.proj(torch.cat(parts, dim=-1))
        if self.position is not None:
            x = x + self.position[-x.shape[1] :]
        if self.time is not None:
            bucket = torch.log2(1.0 + s.gap / 3600.0).floor().clamp(0, self.time_buckets - 1).long()
            x = x + self.time(bucket)
        return x * s.mask.unsqueeze(-1)

    def flops(self) -> int:
        return linear_flops(self.max_len, self.in_dim, self.dim)


class Inputs(nn.Module):
    """Embeds a batch once for any model: non-sequence tokens and per-sequence event tokens.

    → x: [B, N, D]; seqs: name → (tokens [B, L, D], mask [B, L] bool, gap [B, L] seconds).
    One embedding table per vocabulary, shared by fields and sequences that use it.
    """

    def __init__(self, info: FeatureInfo, dim: int, positions: bool = False, time_buckets: int = 0):
        super().__init__()
        self.info = info
        self.tables = embedding_tables(info, dim)
        self.features = FeatureTokens(info, dim)
        self.events = nn.ModuleDict({q.name: EventTokens(q, dim, dim, info.max_len, time_buckets, positions) for q in info.sequences})

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        x = self.features(self.tables, batch.cat, batch.num)
        seqs = {n: (self.events[n](self.tables, s), s.mask, s.gap) for n, s in batch.seqs.items() if n in self.events}
        return x, seqs

    def target_index(self, seq: str) -> int:
        """Position among the non-sequence tokens of the candidate item (the field sharing the sequence's item vocabulary)."""
        vocab = next(q.item_vocab for q in self.info.sequences if q.name == seq)
        return self.info.cat_vocabs.index(vocab)

    def flops(self) -> int:
        return self.features.flops() + sum(e.flops() for e in self.events.values())


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
