"""Stage-1 losses as pure functions: ITC, ITM (with hard-negative sampling) and ITG.

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


__all__ = [
    "ITCOutput",
    "decoder_labels",
    "itc_loss",
    "itg_loss",
    "itm_labels",
    "itm_loss",
    "next_token_targets",
    "positive_mask",
    "sample_itm_negatives",
    "similarity_matrix",
]
