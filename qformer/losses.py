"""Stage-1 losses as pure functions: ITC, ITM (with hard-negative sampling) and ITG, plus the
optional ALBEF/BLIP terms: ITC with momentum-distilled targets and MLM (masking and loss).

Each takes ``rank`` / ``world_size`` explicitly where ranks matter and runs on a single
device with ``world_size=1`` and no process group. The semantics are BLIP-2's
(``../shared/docs/blip2-reference.md`` section 2); the tests check each one against a naive
reference implementation, gradients included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distributed import all_gather_no_grad, all_gather_with_grad
from .errors import NonFiniteLossError

# LAVIS masks positives with this additive value before the negative-sampling softmax;
# keeping it (rather than -inf) keeps rows with no valid negative well defined.
_NEG_FILL = -10000.0


@dataclass
class ITCOutput:
    loss: torch.Tensor  # ()
    sim_i2t: torch.Tensor  # (B, W*B): local images x global texts, divided by temp
    sim_t2i: torch.Tensor  # (B, W*B): local texts x global images, divided by temp
    positives: torch.Tensor  # (B, W*B) bool: which columns count as positives of each row
    # Momentum distillation only (:func:`itc_momentum_loss`): the momentum model's own
    # similarities over the same columns (no gradient), whose softmax makes the soft targets.
    sim_i2t_m: torch.Tensor | None = None  # (B, K)
    sim_t2i_m: torch.Tensor | None = None  # (B, K)


def similarity_matrix(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """BLIP-2's image-text similarity: max over queries of the dot product.

    image_feats (Ni, Q, E), text_feats (Nt, E) -> (Ni, Nt).
    """
    return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)


def positive_mask(
    batch_size: int,
    total: int,
    *,
    rank: int,
    image_ids: torch.Tensor | None = None,
    image_ids_all: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, total) bool: the diagonal at this rank's offset, or every column with the same image id."""
    if image_ids is not None:
        return image_ids.view(-1, 1) == image_ids_all.view(1, -1)
    cols = torch.arange(total, device=device)
    rows = torch.arange(batch_size, device=device) + rank * batch_size
    return cols[None, :] == rows[:, None]


def itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temp: torch.Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
    image_ids: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
    gather_with_grad: bool = True,
) -> ITCOutput:
    """Image-text contrastive loss over the global batch.

    Args:
        image_feats: (B, Q, E) L2-normalised query embeddings of this rank's images.
        text_feats: (B, E) L2-normalised [CLS] embeddings of this rank's texts.
        temp: scalar temperature; similarities are divided by it.
        image_ids: optional (B,) ids; texts of the same image become soft positives
            (normalised, then mixed 0.9 / 0.1 with uniform, as LAVIS's COCO fine-tuning).
        gather_with_grad: True (default) makes W ranks x B samples equal to one process on
            W*B samples, gradients included. False reproduces LAVIS exactly: the gathered
            features carry no gradient at all, local rows included.
    """
    if gather_with_grad:
        image_all = all_gather_with_grad(image_feats, rank=rank, world_size=world_size)  # (WB, Q, E)
        text_all = all_gather_with_grad(text_feats, rank=rank, world_size=world_size)  # (WB, E)
    else:
        image_all = all_gather_no_grad(image_feats, world_size=world_size)
        text_all = all_gather_no_grad(text_feats, world_size=world_size)
    sim_i2t = similarity_matrix(image_feats, text_all) / temp  # (B, WB)
    sim_t2i = similarity_matrix(image_all, text_feats).t() / temp  # (B, WB)
    b, total = sim_i2t.shape
    image_ids_all = None
    if image_ids is not None:
        image_ids_all = all_gather_no_grad(image_ids.view(-1), world_size=world_size)
    positives = positive_mask(
        b, total, rank=rank, image_ids=image_ids, image_ids_all=image_ids_all, device=sim_i2t.device
    )
    if image_ids is None:
        targets = torch.arange(b, device=sim_i2t.device) + rank * b
        loss = (
            F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
        ) / 2
    else:
        soft = positives.float()
        soft = soft / soft.sum(dim=1, keepdim=True)
        soft = (1 - label_smoothing) * soft + label_smoothing / total
        loss = (
            -(F.log_softmax(sim_i2t, dim=1) * soft).sum(dim=1).mean()
            - (F.log_softmax(sim_t2i, dim=1) * soft).sum(dim=1).mean()
        ) / 2
    return ITCOutput(loss=loss, sim_i2t=sim_i2t, sim_t2i=sim_t2i, positives=positives)


def itc_momentum_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temp: torch.Tensor,
    *,
    image_feats_m: torch.Tensor,
    text_feats_m: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    positives: torch.Tensor,
    alpha: float,
    label_smoothing: float = 0.0,
) -> ITCOutput:
    """ITC with momentum distillation (ALBEF / BLIP, ``../shared/docs/blip2-reference.md`` section 11).

    As ALBEF and BLIP: this rank's online features are contrasted with the momentum model's
    features (``*_keys``: the global batch's, then any queue), so no gradient crosses ranks and
    W ranks x B rows are one process on W*B rows. Each row's target is
    ``alpha * softmax(sim_m) + (1 - alpha) * hard``, where ``sim_m`` is the momentum model's own
    similarity row over the same keys and ``hard`` is ITC's usual target (the positives,
    normalised, mixed with uniform by ``label_smoothing``; 0 gives ALBEF's one-hot).

    Args:
        image_feats / text_feats: (B, Q, E) / (B, E) this rank's online features (normalised).
        image_feats_m / text_feats_m: the same rows from the momentum model.
        image_keys / text_keys: (K, Q, E) / (K, E) the momentum features every row is contrasted with.
        positives: (B, K) bool, at least one per row.
        temp: divides every similarity (the target's too, as ALBEF; it gets no gradient there).
    """
    sim_i2t = similarity_matrix(image_feats, text_keys) / temp  # (B, K)
    sim_t2i = similarity_matrix(image_keys, text_feats).t() / temp  # (B, K)
    with torch.no_grad():
        t = temp.detach()
        sim_i2t_m = similarity_matrix(image_feats_m, text_keys) / t
        sim_t2i_m = similarity_matrix(image_keys, text_feats_m).t() / t
        hard = positives.float()
        hard = hard / hard.sum(dim=1, keepdim=True)
        hard = (1 - label_smoothing) * hard + label_smoothing / hard.shape[1]
        target_i2t = alpha * F.softmax(sim_i2t_m.float(), dim=1) + (1 - alpha) * hard
        target_t2i = alpha * F.softmax(sim_t2i_m.float(), dim=1) + (1 - alpha) * hard
    loss = (
        -(F.log_softmax(sim_i2t.float(), dim=1) * target_i2t).sum(dim=1).mean()
        - (F.log_softmax(sim_t2i.float(), dim=1) * target_t2i).sum(dim=1).mean()
    ) / 2
    return ITCOutput(loss=loss, sim_i2t=sim_i2t, sim_t2i=sim_t2i, positives=positives,
                     sim_i2t_m=sim_i2t_m, sim_t2i_m=sim_t2i_m)


@torch.no_grad()
def sample_itm_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    positives: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives for ITM, drawn from the similarity softmax with positives masked.

    Returns global indices ``(neg_image_for_text (B,), neg_text_for_image (B,))``, drawn in
    ONE batched multinomial call (no per-sample host syncs). A row with no valid negative
    (every column a positive) samples uniformly, as LAVIS's masked softmax does.

    Raises:
        NonFiniteLossError: the similarities are NaN or infinite (checked only when the draw
            fails, so a healthy step pays no host sync for it).
    """
    weights_t2i = F.softmax(sim_t2i.float().masked_fill(positives, _NEG_FILL), dim=1)
    weights_i2t = F.softmax(sim_i2t.float().masked_fill(positives, _NEG_FILL), dim=1)
    weights = torch.cat([weights_t2i, weights_i2t])
    try:
        picks = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    except RuntimeError:
        if torch.isfinite(sim_i2t).all() and torch.isfinite(sim_t2i).all():
            raise
        raise NonFiniteLossError("the ITC similarities are not finite (NaN or inf), so no ITM hard negative can "
                                 "be drawn: the model's weights or inputs went non-finite") from None
    b = sim_i2t.shape[0]
    return picks[:b], picks[b:]


def itm_labels(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Labels of the 3B ITM pairs ``[positives ; (text, neg image) ; (image, neg text)]``."""
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1
    return labels


def itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy of (3B, 2) ITM logits laid out as in :func:`itm_labels`."""
    if logits.shape[0] % 3:
        raise ValueError(f"ITM logits must hold 3B rows (pos, neg image, neg text); got {logits.shape[0]}")
    return F.cross_entropy(logits, itm_labels(logits.shape[0] // 3, logits.device))


def decoder_labels(input_ids: torch.Tensor, *, bos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-2's ITG inputs: the text with its first token ([CLS]) replaced by ``[DEC]``, and
    labels equal to those ids with padding set to -100 ([SEP] stays a target)."""
    dec = input_ids.clone()
    dec[:, 0] = bos_token_id
    labels = dec.masked_fill(dec == pad_token_id, -100)
    return dec, labels


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions predict a real next token, and that token.

    labels (B, L) -> (mask (B, L-1) bool over positions 0..L-2, targets (N,)), where N is
    the number of positions whose next label is not -100. Computing the vocabulary logits
    only at those positions is what makes ITG cheap; the loss is unchanged.
    """
    shifted = labels[:, 1:]
    mask = shifted != -100
    return mask, shifted[mask]


def itg_loss(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy with label smoothing, averaged over real targets.

    ``logits`` (N, V) at the positions chosen by :func:`next_token_targets`, ``targets`` (N,).
    """
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


@torch.no_grad()
def mlm_mask(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: list[int] | tuple[int, ...],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (ALBEF / BLIP-1 MLM): each non-special token is chosen with
    ``probability``; a chosen token becomes [MASK] (80%), a random token of the vocabulary
    (10%) or stays (10%). Special tokens ([CLS], [SEP], [PAD], [DEC] ...) are never chosen.

    Three draws from ``generator`` (on ``input_ids``' device; None: torch's global RNG), in a
    fixed order, so a seeded generator reproduces the masks exactly (exact resume).
    Returns ``(masked_ids (B, L), labels (B, L))``: labels hold the original token where
    chosen, -100 elsewhere.
    """
    dev = input_ids.device
    chosen = torch.rand(input_ids.shape, generator=generator, device=dev) < probability
    chosen &= ~torch.isin(input_ids, torch.tensor(list(special_ids), dtype=input_ids.dtype, device=dev))
    how = torch.rand(input_ids.shape, generator=generator, device=dev)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=dev, dtype=input_ids.dtype)
    masked = torch.where(chosen & (how < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, masked)
    return masked, input_ids.masked_fill(~chosen, -100)


def mlm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    soft_targets: torch.Tensor | None = None,
    alpha: float = 0.0,
    world_size: int = 1,
) -> torch.Tensor:
    """Masked-token cross-entropy, optionally distilled: ``(1 - alpha) * CE(targets) + alpha *
    CE(soft_targets)`` per chosen token (ALBEF's momentum MLM), averaged over the chosen tokens
    of the GLOBAL batch.

    ``logits`` (N, V) at this rank's chosen positions, ``targets`` (N,), ``soft_targets`` (N, V)
    probabilities. The sum is divided by the number of chosen tokens over all ranks and
    multiplied by ``world_size``, so the ranks' mean loss (what DDP's gradient average sees) is
    exactly one process's mean on the global batch, however unevenly the masks fell.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    total = F.nll_loss(logp, targets, reduction="sum")
    if soft_targets is not None and alpha > 0:
        total = (1 - alpha) * total - alpha * (logp * soft_targets.float()).sum()
    count = all_gather_no_grad(torch.tensor([targets.numel()], device=logits.device), world_size=world_size).sum()
    return total * world_size / count.clamp(min=1)


__all__ = [
    "ITCOutput",
    "decoder_labels",
    "itc_loss",
    "itc_momentum_loss",
    "itg_loss",
    "itm_labels",
    "itm_loss",
    "mlm_loss",
    "mlm_mask",
    "next_token_targets",
    "positive_mask",
    "sample_itm_negatives",
    "similarity_matrix",
]
