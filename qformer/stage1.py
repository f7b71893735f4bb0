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

Optional, off by default (ALBEF / BLIP-1; ``../shared/docs/blip2-reference.md`` section 11):
momentum distillation (``momentum_distill``: an EMA teacher, :mod:`qformer.momentum`, gives soft
ITC targets and, with ``momentum_queue_size``, a queue of extra negatives) and MLM
(``mlm_weight``: masked tokens of the image-grounded encoder predicted through the LM head).
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
from .distributed import all_gather_no_grad, all_reduce_max, dist_info, gather_rows
from .med import ImageKV, cat_kv, index_kv, put_kv
from .model import Blip2Features, Blip2Model
from .momentum import MomentumTeacher


@dataclass(kw_only=True)
class Stage1Config:
    """What a stage-1 step optimises (an adapter card's ``stage1.objective`` section).

    BLIP-2's defaults: ITC + ITM + ITG with weight 1 each, label smoothing 0.1 for ITC and ITG,
    no temperature clamp (BLIP / ALBEF clamp it to [0.001, 0.5] after each step), no momentum
    distillation, no MLM.

    Momentum distillation (``momentum_*``, ALBEF / BLIP): an EMA copy of the Q-Former side
    (``p_m = momentum * p_m + (1 - momentum) * p`` after each optimizer step; the tower is
    shared, never copied) gives ITC's targets ``alpha * softmax(sim_m) + (1 - alpha) * hard``, and
    ITC contrasts the online features with the momentum features of the global batch plus,
    with ``momentum_queue_size`` > 0, a queue of the last N ones (ALBEF/BLIP); 0 keeps BLIP-2's
    global-batch negatives. ``alpha`` ramps in linearly over ``momentum_alpha_ramp_steps``.
    ITM's hard negatives are drawn, as ALBEF/BLIP draw them, from ITC's logits (the online
    features against the momentum keys), restricted to the global batch; ``momentum_itm`` draws
    them from the momentum model's own similarities instead.

    MLM (``mlm_weight`` > 0, ALBEF / BLIP-1 / FLAVA): ``mlm_probability`` of the non-special
    text tokens are chosen (80% [MASK], 10% random, 10% kept), the image-grounded encoder
    (queries + text, bidirectional) predicts them through the LM head; with momentum
    distillation the momentum model's predictions are mixed in by the same alpha.
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
    # Momentum distillation (ALBEF / BLIP; BLIP-2 has none).
    momentum_distill: bool = False
    momentum: float = 0.995
    momentum_alpha: float = 0.4
    momentum_alpha_ramp_steps: int = 0  # alpha ramps linearly from 0 over this many steps (0: constant)
    momentum_queue_size: int = 0  # 0: no queue, the global batch's negatives only (BLIP-2)
    momentum_itm: bool = False  # ITM negatives from the momentum model's similarities
    # MLM on the image-grounded encoder (ALBEF / BLIP-1 / FLAVA): off at weight 0.
    mlm_weight: float = 0.0
    mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        if min(self.itc_weight, self.itm_weight, self.itg_weight, self.mlm_weight) < 0:
            raise ConfigError(f"stage-1 loss weights must be >= 0, got itc {self.itc_weight}, itm {self.itm_weight}, "
                              f"itg {self.itg_weight}, mlm {self.mlm_weight}")
        if self.loss_ramp_steps < 0:
            raise ConfigError(f"loss_ramp_steps must be >= 0, got {self.loss_ramp_steps}")
        for name in ("momentum", "momentum_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"stage1.objective.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.momentum_alpha_ramp_steps < 0 or self.momentum_queue_size < 0:
            raise ConfigError("stage1.objective.momentum_alpha_ramp_steps and momentum_queue_size must be >= 0")
        if not self.momentum_distill and (self.momentum_queue_size or self.momentum_itm):
            raise ConfigError("stage1.objective.momentum_queue_size / momentum_itm need momentum_distill: true")
        if not 0.0 < self.mlm_probability <= 1.0:
            raise ConfigError(f"stage1.objective.mlm_probability must be in (0, 1], got {self.mlm_probability}")

    def alpha(self, step: int | None) -> float:
        """The distillation weight at optimizer step ``step`` (None: the full alpha)."""
        ramp = self.momentum_alpha_ramp_steps
        return self.momentum_alpha * (1.0 if step is None or ramp == 0 else min(1.0, step / ramp))

    def mlm_weight_at(self, step: int | None) -> float:
        """MLM's weight at ``step``: it ramps in with ITM and ITG (``loss_ramp_steps``)."""
        return stage1_loss_weights(step or 0, itm=self.mlm_weight,
                                   ramp_steps=0 if step is None else self.loss_ramp_steps)[1]

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
    sim_i2t: torch.Tensor  # (B, W*B) divided by temp ((B, W*B + queue) with momentum distillation)
    sim_t2i: torch.Tensor  # (B, W*B)
    itm_logits: torch.Tensor  # (3B, 2): positives, (text, neg image), (image, neg text)
    neg_image_idx: torch.Tensor  # (B,) global index of each text's negative image
    neg_text_idx: torch.Tensor  # (B,) global index of each image's negative text
    features: Blip2Features
    loss_mlm: torch.Tensor | None = None  # only with mlm_weight > 0
    mlm_labels: torch.Tensor | None = None  # (B, L) the masked tokens' ids, -100 elsewhere

    def metrics(self) -> dict[str, float]:
        out = {
            "loss": self.loss.item(),
            "loss_itc": self.loss_itc.item(),
            "loss_itm": self.loss_itm.item(),
            "loss_itg": self.loss_itg.item(),
        }
        if self.loss_mlm is not None:
            out["loss_mlm"] = self.loss_mlm.item()
        return out


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
        c = self.config
        # The EMA teacher (a registered submodule: it moves with the objective; its weights and
        # queue are checkpointed through checkpoint_state, not the model's files).
        self.teacher = MomentumTeacher(model, momentum=c.momentum, queue_size=c.momentum_queue_size) \
            if c.momentum_distill else None
        self._mlm_ids: tuple[int, int, list[int]] | None = None
        if c.mlm_weight > 0:
            tok = model.tokenizer
            if tok is None or tok.mask_token_id is None:
                raise ConfigError("stage1.objective.mlm_weight > 0 needs the model's Q-Former tokenizer with a "
                                  "[MASK] token (Blip2(config, tokenizer=...))")
            if model.qformer.lm_head is None:
                raise ConfigError("stage1.objective.mlm_weight > 0 needs the Q-Former's LM head (qformer.lm_head)")
            special = sorted(set(tok.all_special_ids) | {model.config.dec_token_id, model.config.qformer.pad_token_id})
            self._mlm_ids = (tok.mask_token_id, len(tok), special)

    def after_optimizer_step(self, step: int) -> None:
        """The loop's hook after each optimizer step: BLIP/ALBEF's temperature clamp, if asked;
        the momentum teacher's EMA update and the enqueueing of the step's momentum features."""
        if self.config.clamp_temperature:
            self.model.clamp_temperature_()
        if self.teacher is not None:
            self.teacher.update_()
            self.teacher.flush_()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What exact resume needs beyond the model's weights: the momentum teacher's EMA
        weights and queue (empty without momentum distillation)."""
        return {} if self.teacher is None else self.teacher.checkpoint_state()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
        if self.teacher is None:
            if state:
                raise ConfigError(f"{source} holds a momentum teacher but momentum_distill is off")
            return
        self.teacher.load_checkpoint_state(state, source=source)

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
        mlm_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Stage1Output:
        """One stage-1 step on this rank's batch.

        Args:
            input_ids / attention_mask: (B, L) BERT tokens of the captions ([CLS] first).
            pixel_values: (B, 3, H, W) images; or ``vision_features`` (B, N, C), the frozen
                tower's output (e.g. from a feature cache); or ``image_embeds`` after ln_vision.
            image_ids: (B,) optional; captions of the same image are not negatives of it.
            rank / world_size: default to the process group's (or 0 / 1 without one).
            generator: RNG for the hard-negative draw, then MLM's masking (default: torch's global RNG).
            negatives: pin the draw: (neg_image_idx, neg_text_idx), global indices (B,) each.
            step: optimizer steps done so far; the loss weights ramp with it
                (``config.loss_ramp_steps``). None: the full weights.
            loss_weights: (itc, itm, itg) for this step, overriding the config's.
            mlm_inputs: pin MLM's masking: (masked_ids, labels) (B, L) each, as :func:`losses.mlm_mask`.

        With momentum distillation the teacher reads the same tower output through its own
        ``ln_vision`` (given ``image_embeds`` instead, it reads those), and runs in the
        objective's mode (dropout in training, as ALBEF/BLIP's momentum models).
        """
        if rank is None or world_size is None:
            rank, world_size = dist_info()
        model, teacher = self.model, self.teacher
        cfg = model.config
        if image_embeds is None:
            if pixel_values is None and vision_features is None:
                raise ValueError("Stage1Objective needs pixel_values, vision_features or image_embeds")
            if teacher is not None and vision_features is None:  # the teacher reads the same tower output
                vision_features = model.vision(pixel_values)  # (B, N, C)
            image_embeds = model.embed_image(pixel_values, vision_features=vision_features)  # (B, N, C)
        b = image_embeds.shape[0]
        if input_ids.shape[0] != b:
            raise ValueError(f"batch has {b} images but {input_ids.shape[0]} captions")

        # Pass (a): queries x image, keeping each layer's query K/V for ITG. Pass (b): text alone.
        # ITC reads only [CLS] of pass (b), so its last layer computes only that row.
        feats = model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                      return_query_kv=True, text_cls_only=True)

        feats_m = None
        if teacher is not None:  # the momentum model's features of the same batch (no gradient)
            with torch.no_grad():
                embeds_m = image_embeds.detach() if vision_features is None else \
                    teacher.model.embed_image(vision_features=vision_features.detach())
                feats_m = teacher.model(image_embeds=embeds_m, input_ids=input_ids, attention_mask=attention_mask,
                                        text_cls_only=True)

        # ---------------- ITC
        wb = b * world_size
        if teacher is None:
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
            sims = (itc.sim_i2t, itc.sim_t2i)
        else:
            itc = self._momentum_itc(feats, feats_m, image_ids, step=step, rank=rank, world_size=world_size)
            sims = (itc.sim_i2t_m, itc.sim_t2i_m) if self.config.momentum_itm else (itc.sim_i2t, itc.sim_t2i)

        # ---------------- ITM with hard negatives (from the global batch's columns)
        if negatives is None:
            neg_img, neg_txt = losses.sample_itm_negatives(sims[0][:, :wb], sims[1][:, :wb], itc.positives[:, :wb],
                                                           generator=generator)
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

        # ---------------- MLM (optional): the image-grounded encoder predicts the masked tokens
        loss = self._weighted(itc.loss, loss_itm, loss_itg, loss_weights or self.config.weights(step))
        loss_mlm = labels_mlm = None
        if self._mlm_ids is not None:
            loss_mlm, labels_mlm = self._mlm(input_ids, attention_mask, feats, feats_m, mlm_inputs,
                                             generator=generator, step=step, world_size=world_size)
            loss = loss + self.config.mlm_weight_at(step) * loss_mlm

        return Stage1Output(
            loss=loss,
            loss_itc=itc.loss,
            loss_itm=loss_itm,
            loss_itg=loss_itg,
            sim_i2t=itc.sim_i2t,
            sim_t2i=itc.sim_t2i,
            itm_logits=itm_logits,
            neg_image_idx=neg_img,
            neg_text_idx=neg_txt,
            features=feats,
            loss_mlm=loss_mlm,
            mlm_labels=labels_mlm,
        )

    def _momentum_itc(self, feats: Blip2Features, feats_m: Blip2Features, image_ids: torch.Tensor | None, *,
                      step: int | None, rank: int, world_size: int) -> losses.ITCOutput:
        """ITC against the momentum keys ``[global batch ; queue]`` with distilled targets; the
        global batch's momentum features are kept for the queue (enqueued after the step)."""
        teacher = self.teacher
        image_all = all_gather_no_grad(feats_m.image_feats, world_size=world_size)  # (WB, Q, E)
        text_all = all_gather_no_grad(feats_m.text_feats, world_size=world_size)  # (WB, E)
        ids_all = None if image_ids is None else all_gather_no_grad(image_ids.view(-1), world_size=world_size)
        image_q, text_q, ids_q = teacher.queue(text_all.device)  # (n, Q, E), (n, E), (n,)
        b = feats.text_feats.shape[0]
        positives = losses.positive_mask(b, text_all.shape[0], rank=rank, image_ids=image_ids,
                                         image_ids_all=ids_all, device=text_all.device)  # (B, WB)
        queue_pos = (torch.zeros(b, ids_q.shape[0], dtype=torch.bool, device=ids_q.device) if image_ids is None
                     else image_ids.view(-1, 1) == ids_q.view(1, -1))  # (B, n)
        out = losses.itc_momentum_loss(
            feats.image_feats, feats.text_feats, self.model.temperature,
            image_feats_m=feats_m.image_feats, text_feats_m=feats_m.text_feats,
            image_keys=torch.cat([image_all, image_q.to(image_all.dtype)]),
            text_keys=torch.cat([text_all, text_q.to(text_all.dtype)]),
            positives=torch.cat([positives, queue_pos], dim=1), alpha=self.config.alpha(step),
            label_smoothing=self.config.itc_label_smoothing,
        )
        teacher.defer(image_all, text_all, ids_all)
        return out

    def _mlm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, feats: Blip2Features,
             feats_m: Blip2Features | None, pinned: tuple[torch.Tensor, torch.Tensor] | None, *,
             generator: torch.Generator | None, step: int | None, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM's loss and labels. The image K/V come from the query-only pass; vocabulary logits
        are computed only at the chosen positions."""
        mask_id, vocab, special = self._mlm_ids
        if pinned is None:
            masked, labels = losses.mlm_mask(input_ids, mask_token_id=mask_id, vocab_size=vocab, special_ids=special,
                                             probability=self.config.mlm_probability, generator=generator)
        else:
            masked, labels = (t.to(input_ids.device) for t in pinned)
        chosen = labels != -100  # (B, L)
        hidden = self.model.grounded_text(masked, attention_mask, feats.image.image_kv)  # (B, L, D)
        logits = self.model.lm_logits(hidden[chosen])  # (N, V)
        soft = None
        if feats_m is not None:
            with torch.no_grad():
                teacher = self.teacher.model
                hidden_m = teacher.grounded_text(masked, attention_mask, feats_m.image.image_kv)
                soft = torch.softmax(teacher.lm_logits(hidden_m[chosen]).float(), dim=-1)  # (N, V)
        loss = losses.mlm_loss(logits, labels[chosen], soft_targets=soft, alpha=self.config.alpha(step),
                               world_size=world_size)
        return loss, labels

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
