"""Stage 1: ITC + ITM + ITG with equal weights, one frozen-ViT pass per image.

:class:`Stage1Objective` wraps a :class:`~qformer.model.Blip2Model` so that a whole training step
(every Q-Former pass) happens inside one ``forward`` — which is what DDP, FSDP and
DeepSpeed need to synchronise gradients. It only orchestrates: features come from the
model's methods, losses from the pure functions in :mod:`qformer.losses`.

Work reused across passes (BLIP-2's original code recomputes it):

* the image's cross-attention K/V are computed once, in the query-only pass, and indexed
  for the 3B ITM pairs; only negatives owned by another rank get fresh K/V;
* the queries' self-attention K/V from that pass feed the ITG decoder directly;
* only the rows chosen as negatives cross ranks (:func:`qformer.distributed.gather_rows`);
* negatives are drawn in one batched ``torch.multinomial`` call;
* ITG vocabulary logits are computed only at positions that have a target;
* work no loss reads is skipped: the last layer of the ITM pass computes only the query
  rows (ITM averages their head), that of the text-only pass only [CLS] (ITC's feature).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .config import ConfigError, _from_dict
from .distributed import all_reduce_max, dist_info, gather_rows
from .med import ImageKV, cat_kv, index_kv, put_kv
from .model import Blip2Features, Blip2Model


@dataclass(kw_only=True)
class Stage1Config:
    """What a stage-1 step optimises (an adapter card's ``stage1.objective`` section).

    BLIP-2's defaults: ITC + ITM + ITG with weight 1 each, label smoothing 0.1 for ITC and ITG,
    no temperature clamp (BLIP / ALBEF clamp it to [0.001, 0.5] after each step).
    """

    itc_weight: float = 1.0
    itm_weight: float = 1.0
    itg_weight: float = 1.0
    # ITM and ITG weights ramp linearly from 0 over this many optimizer steps (0: constant).
    loss_ramp_steps: int = 0
    itc_label_smoothing: float = 0.1
    itg_label_smoothing: float = 0.1
    # ITC gathers other ranks' features with gradient: W ranks x B samples are exactly one
    # process on W*B. False reproduces LAVIS (gathered features carry no gradient).
    gather_with_grad: bool = True
    clamp_temperature: bool = False

    def __post_init__(self) -> None:
        if min(self.itc_weight, self.itm_weight, self.itg_weight) < 0:
            raise ConfigError(f"stage-1 loss weights must be >= 0, got itc {self.itc_weight}, itm {self.itm_weight}, "
                              f"itg {self.itg_weight}")
        if self.loss_ramp_steps < 0:
            raise ConfigError(f"loss_ramp_steps must be >= 0, got {self.loss_ramp_steps}")

    def weights(self, step: int | None) -> tuple[float, float, float]:
        """(itc, itm, itg) weights at optimizer step ``step`` (None: the full weights)."""
        return stage1_loss_weights(step or 0, itc=self.itc_weight, itm=self.itm_weight, itg=self.itg_weight,
                                   ramp_steps=0 if step is None else self.loss_ramp_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stage1Config":
        return _from_dict(cls, data, "stage1.objective")


@dataclass
class Stage1Output:
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_itg: torch.Tensor
    sim_i2t: torch.Tensor  # (B, W*B) divided by temp
    sim_t2i: torch.Tensor  # (B, W*B)
    itm_logits: torch.Tensor  # (3B, 2): positives, (text, neg image), (image, neg text)
    neg_image_idx: torch.Tensor  # (B,) global index of each text's negative image
    neg_text_idx: torch.Tensor  # (B,) global index of each image's negative text
    features: Blip2Features

    def metrics(self) -> dict[str, float]:
        return {
            "loss": self.loss.item(),
            "loss_itc": self.loss_itc.item(),
            "loss_itm": self.loss_itm.item(),
            "loss_itg": self.loss_itg.item(),
        }


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return x if x.shape[1] == length else F.pad(x, (0, length - x.shape[1]), value=value)


def stage1_loss_weights(
    step: int, *, itc: float = 1.0, itm: float = 1.0, itg: float = 1.0, ramp_steps: int = 0
) -> tuple[float, float, float]:
    """(itc, itm, itg) weights at optimizer step ``step``: ITM and ITG ramp linearly from 0 to
    their value over the first ``ramp_steps`` steps (0: constant, as BLIP-2).

    Why a ramp: a Q-Former trained from scratch (no BERT to start from) starts with queries
    that barely depend on the image; ITG then rewards using them as image-independent memory,
    and ITC can sit at its chance level (ln B) for hundreds of steps. Letting ITC lead for a
    few dozen steps makes the queries image-dependent first.
    """
    if ramp_steps < 0:
        raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
    r = 1.0 if ramp_steps == 0 else min(1.0, step / ramp_steps)
    return (itc, r * itm, r * itg)


class Stage1Objective(nn.Module):
    """``forward(batch) -> Stage1Output`` for BLIP-2 stage 1.

    Args:
        model: the :class:`~qformer.model.Blip2Model` to train.
        config: a :class:`Stage1Config` (default: BLIP-2's); keyword ``overrides`` replace its
            fields (``Stage1Objective(model, gather_with_grad=False)``).
    """

    def __init__(self, model: Blip2Model, config: Stage1Config | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config if config is not None else Stage1Config()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.model = model

    def after_optimizer_step(self, step: int) -> None:
        """The loop's hook after each optimizer step: BLIP/ALBEF's temperature clamp, if asked."""
        if self.config.clamp_temperature:
            self.model.clamp_temperature_()

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        generator: torch.Generator | None = None,
        negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        step: int | None = None,
        loss_weights: tuple[float, float, float] | None = None,
    ) -> Stage1Output:
        """One stage-1 step on this rank's batch.

        Args:
            input_ids / attention_mask: (B, L) BERT tokens of the captions ([CLS] first).
            pixel_values: (B, 3, H, W) images; or ``vision_features`` (B, N, C), the frozen
                tower's output (e.g. from a feature cache); or ``image_embeds`` after ln_vision.
            image_ids: (B,) optional; captions of the same image are not negatives of it.
            rank / world_size: default to the process group's (or 0 / 1 without one).
            generator: RNG for the hard-negative draw (default: torch's global RNG).
            negatives: pin the draw: (neg_image_idx, neg_text_idx), global indices (B,) each.
            step: optimizer steps done so far; the loss weights ramp with it
                (``config.loss_ramp_steps``). None: the full weights.
            loss_weights: (itc, itm, itg) for this step, overriding the config's.
        """
        if rank is None or world_size is None:
            rank, world_size = dist_info()
        model = self.model
        cfg = model.config
        if image_embeds is None:
            if pixel_values is None and vision_features is None:
                raise ValueError("Stage1Objective needs pixel_values, vision_features or image_embeds")
            image_embeds = model.embed_image(pixel_values, vision_features=vision_features)  # (B, N, C)
        b = image_embeds.shape[0]
        if input_ids.shape[0] != b:
            raise ValueError(f"batch has {b} images but {input_ids.shape[0]} captions")

        # Pass (a): queries x image, keeping each layer's query K/V for ITG. Pass (b): text alone.
        # ITC reads only [CLS] of pass (b), so its last layer computes only that row.
        feats = model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                      return_query_kv=True, text_cls_only=True)

        # ---------------- ITC
        itc = losses.itc_loss(
            feats.image_feats,
            feats.text_feats,
            model.temperature,
            rank=rank,
            world_size=world_size,
            image_ids=image_ids,
            label_smoothing=self.config.itc_label_smoothing,
            gather_with_grad=self.config.gather_with_grad,
        )

        # ---------------- ITM with hard negatives
        if negatives is None:
            neg_img, neg_txt = losses.sample_itm_negatives(itc.sim_i2t, itc.sim_t2i, itc.positives, generator=generator)
        else:
            neg_img, neg_txt = (t.to(input_ids.device) for t in negatives)
        # Texts of other ranks may be padded to other lengths: agree on one.
        length = all_reduce_max(input_ids.shape[1], world_size=world_size, device=input_ids.device)
        ids = _pad_to(input_ids, length, cfg.qformer.pad_token_id)
        mask = _pad_to(attention_mask, length, 0)
        neg_ids = gather_rows(ids, neg_txt, rank=rank, world_size=world_size)  # (B, L)
        neg_mask = gather_rows(mask, neg_txt, rank=rank, world_size=world_size)
        image_kv = feats.image.image_kv
        neg_kv = self._negative_image_kv(image_embeds, image_kv, neg_img, rank=rank, world_size=world_size)
        itm_logits = model.itm_logits(
            torch.cat([ids, ids, neg_ids]),
            torch.cat([mask, mask, neg_mask]),
            cat_kv(image_kv, neg_kv, image_kv),
        )  # (3B, 2)
        loss_itm = losses.itm_loss(itm_logits)

        # ---------------- ITG: [DEC] + causal text over the query prefix
        dec_ids, labels = losses.decoder_labels(
            input_ids, bos_token_id=cfg.dec_token_id, pad_token_id=cfg.qformer.pad_token_id
        )
        hidden = model.decode_text(dec_ids, attention_mask, feats.image.query_kv)  # (B, L, D)
        positions, targets = losses.next_token_targets(labels)
        logits = model.lm_logits(hidden[:, :-1][positions])  # (N, V)
        loss_itg = losses.itg_loss(logits, targets, label_smoothing=self.config.itg_label_smoothing)

        return Stage1Output(
            loss=self._weighted(itc.loss, loss_itm, loss_itg, loss_weights or self.config.weights(step)),
            loss_itc=itc.loss,
            loss_itm=loss_itm,
            loss_itg=loss_itg,
            sim_i2t=itc.sim_i2t,
            sim_t2i=itc.sim_t2i,
            itm_logits=itm_logits,
            neg_image_idx=neg_img,
            neg_text_idx=neg_txt,
            features=feats,
        )

    @staticmethod
    def _weighted(itc: torch.Tensor, itm: torch.Tensor, itg: torch.Tensor,
                  weights: tuple[float, float, float]) -> torch.Tensor:
        w_itc, w_itm, w_itg = weights
        return w_itc * itc + w_itm * itm + w_itg * itg  # x 1.0 is exact: BLIP-2's plain sum by default

    def _negative_image_kv(
        self,
        image_embeds: torch.Tensor,
        image_kv: ImageKV,
        neg_img: torch.Tensor,
        *,
        rank: int,
        world_size: int,
    ) -> ImageKV:
        """Cross-attention K/V of each text's negative image: local negatives reuse the
        cached K/V; negatives held by another rank are fetched (only those rows, with
        gradient) and projected once."""
        b = image_embeds.shape[0]
        if world_size == 1:
            return index_kv(image_kv, neg_img)
        fetched = gather_rows(image_embeds, neg_img, rank=rank, world_size=world_size)  # (B, N, C)
        local = (neg_img // b) == rank
        kv = index_kv(image_kv, torch.where(local, neg_img - rank * b, 0))
        remote = (~local).nonzero().squeeze(1)
        if remote.numel() == 0:
            return kv
        return put_kv(kv, remote, self.model.image_kv(fetched[remote]))
