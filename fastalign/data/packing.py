"""Padding-free forwards (`data.packing: true`): the real tokens of a right-padded batch [N, L]
concatenated into one row [1, T] (T = the batch's real tokens), with position ids restarting at 0
for every sequence, and per-token results scattered back to the padded layout afterwards.

Collated batches stay padded (every algorithm's loss code reads [N, L] tensors); only the model
forward runs packed, so no pad token is embedded, attended to or projected onto the vocabulary.
Attention stays inside each sequence because transformers' masking_utils (checked in 5.25) reads
packed sequences off the position ids when no attention mask is given: a position that does
not follow its predecessor by 1 starts a new sequence, and the causal mask becomes
block-diagonal (sdpa and eager build it; flash-attention takes the sequence boundaries). A model
that does not do this is refused by `check_no_leak`, run once per model before its first packed
forward.

Positions are those of the padded forward of a right-padded row (0..len-1), so a packed forward
is the padded one's math, summed in another order (other GEMM shapes, other key counts in the
attention softmax); tests/test_packing.py compares the two.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from fastalign.data.collate import IGNORE
from fastalign.errors import ConfigError


@dataclass(frozen=True)
class PackedRows:
    """Where the real tokens of a padded [N, L] batch sit in its packed row.

    input_ids, position_ids: [1, T];  index: [T] flat offsets into the [N, L] layout (row-major,
    so sequence after sequence);  shape: (N, L)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor
    shape: tuple

    @property
    def num_tokens(self) -> int:
        return int(self.index.numel())

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, L, ...] -> its real-token entries [T, ...] in packed order."""
        n, length = self.shape
        if tuple(x.shape[:2]) != (n, length):
            raise ValueError(f"PackedRows.gather: expected a tensor of shape [{n}, {length}, ...], got {tuple(x.shape)}")
        return x.reshape(n * length, *x.shape[2:]).index_select(0, self.index)

    def scatter(self, x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """x [T, ...] -> [N, L, ...], `fill` at the padding; differentiable."""
        if x.dim() == 0 or x.shape[0] != self.num_tokens:
            raise ValueError(f"PackedRows.scatter: expected {self.num_tokens} packed entries, got shape {tuple(x.shape)}")
        n, length = self.shape
        out = x.new_full((n * length, *x.shape[1:]), fill)
        return out.index_copy(0, self.index, x).view(n, length, *x.shape[1:])  # out of place: autograd works


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows:
    """The packing of a right-padded batch: input_ids [N, L], attention_mask [N, L] (1 on the
    real tokens, which must come first in every row). Raises ValueError for anything else -- a
    left-padded or holed mask, or a [N, 1, L, L] mask of rows packed already (SFT's
    `algo.packing`) -- rather than packing it wrongly."""
    if attention_mask is None or attention_mask.dim() != 2:
        got = "no attention mask" if attention_mask is None else f"a {attention_mask.dim()}-D attention mask"
        raise ValueError(f"packing needs a right-padded batch with a [N, L] attention mask, got {got} "
                         "(rows packed with a block-diagonal mask, e.g. by SFT's algo.packing, cannot be packed again)")
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"packing: input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} differ in shape")
    n, length = input_ids.shape
    mask = attention_mask.bool()
    positions = torch.arange(length, device=mask.device).expand(n, length)
    if not torch.equal(mask, positions < mask.sum(1, keepdim=True)):
        raise ValueError("packing needs right padding: every row's real tokens first, then only padding")
    index = mask.reshape(-1).nonzero().squeeze(1)
    if index.numel() == 0:
        raise ValueError("packing: the batch has no tokens")
    return PackedRows(input_ids.reshape(-1)[index][None], positions.reshape(-1)[index][None], index, (n, length))


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[N, L]: at position t the label of t + 1 (what logits[t] predicts), IGNORE at the last
    column. Gathered into packed order, a sequence's last token gets the padding's IGNORE, so no
    target crosses into the next sequence."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


# ---- the one-time check that a model confines attention to each packed sequence ------------------

_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _describe(model) -> str:
    inner = getattr(model, "lm", model)
    attn = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    return f"{type(inner).__name__}" + (f" (attention implementation {attn!r})" if attn else "")


def check_no_leak(model, forward, *, vocab_size: int, device) -> None:
    """Raises ConfigError unless `forward(input_ids [1, T], position_ids [1, T]) -> [1, T, ...]`
    keeps two packed sequences apart; once per model (cached weakly).

    The probe packs two 4-token sequences, then changes every token of the first: the second's
    outputs must not change, bit for bit. That comparison is exact: the two runs have the same
    shapes and masks, the first sequence's keys weigh exactly 0 for the second's queries, and 0
    times a finite value adds exactly nothing -- so any difference is a leak (or a model that
    ignores position_ids and so sees one sequence). Run in eval mode (no dropout), without
    gradients."""
    if model in _CHECKED:
        return
    ids = (vocab_size // 3 + torch.arange(8, device=device)) % vocab_size  # away from the usual pad id 0
    changed = ids.clone()
    changed[:4] = (ids[:4] + 1 + vocab_size // 2) % vocab_size
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3], device=device)
    was_training = bool(getattr(model, "training", False))
    try:
        if was_training:
            model.train(False)
        with torch.no_grad():
            try:
                a = forward(ids[None], positions[None])
                b = forward(changed[None], positions[None])
            except TypeError as e:  # e.g. a forward without position_ids
                raise ConfigError(f"data.packing: the model {_describe(model)} cannot run packed sequences ({e}); "
                                  "set data.packing=false") from None
    finally:
        if was_training:
            model.train(True)
    if not torch.equal(a[0, 4:], b[0, 4:]):
        raise ConfigError(f"data.packing: the model {_describe(model)} lets packed sequences attend to each other "
                          "(its attention does not start a new sequence where position_ids restart at 0); "
                          "use a transformers model with sdpa, eager or flash attention, or set data.packing=false")
    _CHECKED[model] = True
