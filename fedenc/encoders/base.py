"""The contract every session encoder fulfils.

An encoder turns a :class:`~fedenc.data.batching.SessionBatch` into one session vector per row and
scores every item of the catalog against it. It also says which of its parameters form the
**shared encoder** (exchanged by the federation) and which form the **local head** that never
leaves a child.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedenc.data.batching import SessionBatch
from fedenc.encoders.layers.full_softmax import default_chunk, full_softmax_cross_entropy
from fedenc.encoders.layers.ranking import count_ranks
from fedenc.encoders.layers.tied_lookup import tied, tied_embedding

MAX_HIDDEN = 8192
MAX_STEPS = 64
MAX_TABLE_ELEMENTS = 2**32  # 16 GiB of float32
MAX_POSITION = 100_000  # sessions longer than this share the last position embedding


@dataclass
class EncoderConfig:
    """Hyper-parameters common to the session encoders (each encoder may ignore some)."""

    num_items: int
    hidden: int = 100
    steps: int = 1  # graph-propagation steps
    use_positions: bool = True  # reversed position embeddings (US20220114218A1)
    max_position: int = 200  # longer sessions share the last position embedding
    normalize: bool = True  # L2-normalised item and session vectors (NISER), scaled logits
    scale: float = 12.0  # logit scale when ``normalize`` is on
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # encoder-specific options

    def __post_init__(self) -> None:
        # Types first: "16" < 1 or a float table size would fail later, in torch, unnamed.
        for name in ("num_items", "hidden", "steps", "max_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
            setattr(self, name, int(value))  # a NumPy integer too
        for name in ("use_positions", "normalize"):
            value = getattr(self, name)
            # 0 and 1 as well: configs and checkpoints that wrote them so still load.
            if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):
                raise TypeError(f"{name} must be a bool, got {value!r}")
            setattr(self, name, bool(value))
        for name in ("scale", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        for name, value, least in (
            ("hidden", self.hidden, 1),
            ("steps", self.steps, 0),
            ("max_position", self.max_position, 1),
        ):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        # Bounds far above any session encoder, so that a typo (or a remote job spec) fails
        # here rather than as a multi-terabyte allocation on the master and every child.
        if self.hidden > MAX_HIDDEN or self.steps > MAX_STEPS:
            raise ValueError(
                f"hidden must be <= {MAX_HIDDEN} and steps <= {MAX_STEPS}, "
                f"got {self.hidden} and {self.steps}"
            )
        if self.max_position > MAX_POSITION:
            raise ValueError(f"max_position must be <= {MAX_POSITION}, got {self.max_position}")
        if (self.num_items + 1) * self.hidden > MAX_TABLE_ELEMENTS:
            raise ValueError(
                f"an item table of {self.num_items + 1} x {self.hidden} is above "
                f"{MAX_TABLE_ELEMENTS:,} values ({4 * MAX_TABLE_ELEMENTS / 2**30:.0f} GiB)"
            )
        if not 0 < self.scale < math.inf:  # NaN fails too
            # 0 scores every item alike: every target would tie with every item.
            raise ValueError(f"scale must be a finite number > 0, got {self.scale}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SessionEncoder(nn.Module, ABC):
    """Base class: item embeddings, a session-vector network, and full-catalog scoring.

    Items are ``1..num_items``; row 0 of the embedding is padding. :meth:`score` returns logits over
    items ``1..num_items`` (column ``j`` is item ``j + 1``).
    """

    type_name: ClassVar[str] = ""
    extra_options: ClassVar[frozenset[str] | None] = None
    """The ``config.extra`` keys this encoder reads; any other is refused by ``build_encoder``.
    None (a plugin that does not say) accepts any."""
    #: Parameter-name prefixes of the local head (everything else is the shared encoder).
    head_prefixes: ClassVar[tuple[str, ...]] = ("embedding.",)

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.num_items + 1, config.hidden, padding_idx=0)

    def reset_parameters(self) -> None:
        """SR-GNN's initialisation: every parameter uniform in ±1/√d."""
        bound = 1.0 / math.sqrt(self.config.hidden)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    @abstractmethod
    def encode(self, batch: SessionBatch) -> Tensor:
        """Session vectors, shape (B, hidden)."""

    def item_weights(self) -> Tensor:
        """The candidate item vectors scored against sessions, shape (num_items, hidden)."""
        return self.embedding.weight[1:]

    def item_vectors(self, items: Tensor) -> Tensor:
        """Input embeddings of item ids (normalised when the encoder normalises)."""
        if isinstance(self.embedding, nn.Embedding):
            emb = tied_embedding(items, self.embedding.weight)  # see loss()
        else:  # a stand-in table (the PS trainer's batch rows) does its own lookup
            emb = self.embedding(items)
        return F.normalize(emb, dim=-1) if self.config.normalize else emb

    @torch.no_grad()
    def recommend(
        self, sessions: Sequence[Sequence[int]], k: int = 20, exclude_clicked: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` items scored highest after each session of item ids (1..N, in click
        order): ``(item ids (B, k), scores (B, k))``, best first. Ids are the catalog's own
        (1-based), not column indices. ``exclude_clicked`` leaves out the session's own items.
        Runs in eval mode and puts the model back as it was."""
        from fedenc.data.batching import batch_from_sessions

        n = self.config.num_items
        if not 1 <= k <= n:
            raise ValueError(f"k must lie in 1..{n} (the catalog), got {k}")
        sessions = _checked_sessions(sessions, n)
        if exclude_clicked and k > n - min(len(set(s)) for s in sessions):
            raise ValueError(f"k = {k} is more than the items a session did not click")
        was_training = self.training
        self.eval()
        try:
            batch = batch_from_sessions(sessions).to(self.embedding_device())
            scores = self.score(self.encode(batch))
        finally:
            self.train(was_training)
        if exclude_clicked:
            for row, clicked in enumerate(sessions):
                scores[row, torch.as_tensor(list(clicked), device=scores.device) - 1] = -torch.inf
        values, cols = scores.topk(k, dim=1)
        return cols + 1, values

    def embedding_device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.parameters()).device

    def score(self, session: Tensor) -> Tensor:
        """Logits of every catalog item, shape (B, num_items)."""
        return self.scoring_session(session) @ self.scoring_weights().t()

    def scoring_session(self, session: Tensor) -> Tensor:
        """The session vectors as scored: unit length times ``scale`` when normalising (NISER)."""
        if self.config.normalize:
            return F.normalize(session, dim=-1) * self.config.scale
        return session

    def scoring_weights(self) -> Tensor:
        """The item vectors :meth:`score` multiplies with (normalised when configured)."""
        cached: Tensor | None = self.__dict__.get("_frozen_scoring")
        if cached is not None:
            return cached
        weights = self.item_weights()
        if not self.config.normalize:
            return weights
        return weights * torch.rsqrt((weights * weights).sum(1, keepdim=True).clamp_min(1e-24))

    @contextmanager
    def frozen_scoring(self) -> Iterator[None]:
        """Compute the (normalised) scoring table once for a whole pass without autograd.

        Evaluation and serving score many batches against unchanged weights; normalising a 43k-row
        table per batch would cost a third of an evaluation batch. Inside the block the weights
        must not change (an explicit scope, because fused optimizers update parameters in place
        without bumping their version counters).
        """
        with torch.no_grad():
            self.__dict__["_frozen_scoring"] = self.scoring_weights().detach()
        try:
            yield
        finally:
            # The scoring table and whatever an encoder derived from its frozen weights.
            for key in [k for k in self.__dict__ if k.startswith("_frozen_")]:
                del self.__dict__[key]

    def _ranking_table(self) -> tuple[Tensor, Tensor | None]:
        """The scoring table in the order :meth:`rank_targets` visits it, and each item's place
        in that order (None: item order).

        Inside :meth:`frozen_scoring`, items with the largest raw embeddings come first. Ranks
        do not depend on the order, but a capped rank is settled as soon as ``limit`` items beat
        the target, and the items that beat a missed target are mostly the frequently trained,
        popular ones, whose embeddings grow largest. On Diginetica (trained ``srgnn``, 4,096-item
        blocks) the share of sessions still scored per block drops from 62% to 57% on average,
        close to ordering by training counts (56.5%), which the model does not know."""
        weights = self.scoring_weights()
        if "_frozen_scoring" not in self.__dict__:
            return weights, None
        cached: tuple[Tensor, Tensor] | None = self.__dict__.get("_frozen_ranking")
        if cached is None:
            with torch.no_grad():
                order = torch.argsort(self.item_weights().norm(dim=1), descending=True)
                place = torch.empty_like(order)
                place[order] = torch.arange(order.shape[0], device=order.device)
                cached = (weights.index_select(0, order), place)
            self.__dict__["_frozen_ranking"] = cached
        return cached

    def forward(self, batch: SessionBatch) -> Tensor:
        return self.score(self.encode(batch))

    def rank_targets(
        self, batch: SessionBatch, chunk: int | None = None, limit: int | None = None
    ) -> Tensor:
        """0-based rank of every target among all catalog items: the number of other items scored
        at least as high (exact ties count against the target, while scores equal only up to float
        rounding fall either way, see :mod:`.layers.ranking`; a NaN score ranks last).

        Scores are produced and counted ``chunk`` items at a time, so the (B, N) logit matrix is
        never materialised: each block stays in cache, which on a 43k-item catalog is worth more
        than the GEMM itself. The target's own column is excluded from its count. ``chunk``
        defaults to :func:`~.layers.full_softmax.default_chunk` of the model's device.

        With ``limit`` (Recall@K / MRR@K need no more than ``limit = max K``), a rank of
        ``limit`` or more is returned as ``limit``, and a session leaves the scoring as soon as
        ``limit`` items beat its target (:func:`~.layers.ranking.count_ranks`).
        """
        if batch.targets.numel() and int(batch.targets.min()) < 1:
            # 0 would rank item N (index -1), and batch_from_sessions' -1 means "no target".
            raise ValueError("rank_targets needs the batch's targets: item ids from 1")
        session = self.scoring_session(self.encode(batch))
        weights = self.scoring_weights()
        if chunk is None:
            chunk = default_chunk(weights.device)
        place = None
        if limit is not None and chunk < weights.shape[0]:  # else no block is ever skipped
            weights, place = self._ranking_table()
        cols = batch.targets - 1 if place is None else place[batch.targets - 1]
        target_score = (session * weights[cols]).sum(1)
        n = weights.shape[0]
        blocks = ((lo, weights[lo : lo + chunk]) for lo in range(0, n, chunk))
        return count_ranks(session, target_score, cols, blocks, n, limit)

    def loss(self, batch: SessionBatch) -> Tensor:
        """Mean full-softmax cross-entropy of the batch's targets over the whole catalog.

        Equal to ``cross_entropy(self(batch), targets - 1)``, computed in item chunks without the
        (B, N) logit and (N, d) normalisation temporaries (:mod:`.layers.full_softmax`).
        """
        table = self.embedding.weight
        # The input lookups hand their rows to the loss's dense table gradient (.tied_lookup).
        # Differentiate it with backward(), which the tie's end-of-pass fallback relies on.
        targets = batch.targets
        if targets.numel() == 0 or bool(((targets < 1) | (targets > table.shape[0] - 1)).any()):
            # -1 is batch_from_sessions' "no target"; it would be scored as item N - 1.
            raise ValueError(
                "loss needs every session's target, an item id in 1.."
                f"{table.shape[0] - 1}: got {targets.tolist()[:8]}"
            )
        with tied(table) as tie:
            session = self.scoring_session(self.encode(batch))
        return full_softmax_cross_entropy(
            session, table, batch.targets, self.config.normalize, tie=tie
        )

    # -- federation split -------------------------------------------------------------------
    def shared_parameter_names(self) -> list[str]:
        """Ordered names of the shared-encoder parameters (what the federation exchanges)."""
        return [n for n, _ in self.named_parameters() if not n.startswith(self.head_prefixes)]

    def head_parameter_names(self) -> list[str]:
        """Ordered names of the local-head parameters (they stay on the child when the job shares
        the encoder only: ``share = "encoder"``)."""
        return [n for n, _ in self.named_parameters() if n.startswith(self.head_prefixes)]

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"num_items={c.num_items}, hidden={c.hidden}, steps={c.steps}, "
            f"positions={c.use_positions}, normalize={c.normalize}"
        )


def position_ids(positions: Tensor, max_position: int) -> Tensor:
    """Clamp reversed positions into the embedding table (padding stays 0)."""
    return positions.clamp(max=max_position)


__all__ = ["EncoderConfig", "SessionEncoder", "position_ids"]


def _checked_sessions(sessions: Any, n: int) -> list[list[int]]:
    """:meth:`SessionEncoder.recommend`'s sessions as lists of ints, or an error naming what is
    wrong (one session given bare, ids that are not integers or not in the catalog)."""
    if isinstance(sessions, Tensor):
        sessions = sessions.tolist() if sessions.dim() == 2 else sessions
    if isinstance(sessions, (str, bytes)) or not isinstance(sessions, Sequence):
        raise TypeError(
            f"sessions must be a list of sessions (each a list of item ids), got {sessions!r:.80}"
        )
    if not sessions:
        raise ValueError("no sessions given")
    out: list[list[int]] = []
    for row, session in enumerate(sessions):
        if isinstance(session, (np.ndarray, Tensor)) and session.ndim == 1:
            session = session.tolist()  # one session as an array (Sessions.session(i))
        if isinstance(session, (str, bytes)) or not isinstance(session, Sequence):
            raise TypeError(
                f"session {row} is {session!r:.40}, not a list of item ids (one session goes "
                "in a list of its own: [[12, 5, 7]])"
            )
        if not session:
            raise ValueError(f"session {row} has no clicks")
        for item in session:
            if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                raise TypeError(f"session {row}: item ids are integers, got {item!r}")
            if not 1 <= item <= n:
                raise ValueError(
                    f"session {row}: item id {item} is outside the encoder's catalog (1..{n})"
                )
        out.append([int(i) for i in session])
    return out
