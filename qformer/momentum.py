"""The momentum teacher of ALBEF / BLIP: an exponential moving average of the Q-Former side of a
:class:`~qformer.model.Blip2Model`, plus an optional queue of its past features.

``../shared/docs/blip2-reference.md`` section 11. The EMA copy holds exactly the parts the
momentum features are computed with -- ``ln_vision``, the query tokens, the Q-Former (with its
LM head, for MLM's soft targets) and the two ITC projections -- and SHARES everything else with
the online model without registering it: the vision tower (frozen in stage 1; when the tower is
fine-tuned the teacher still reads the online tower's output, so no tower is ever copied), the
ITM head, the temperature, any LLM. It is a real ``Blip2Model`` (same class, same methods), so
the momentum features go through the very code the online features do.

The queue (ALBEF 65,536, BLIP 57,600 entries; 0 = none, BLIP-2's global-batch negatives) holds
normalised momentum image features (N, Q, E) -- Q x E floats an entry, 32 KiB at BLIP-2's
sizes -- text features (N, E) and image ids. It is kept out of the module's buffers on purpose:
DDP broadcasts buffers from rank 0 before every forward, which for a queue this size would be
gigabytes per step; every rank enqueues the same gathered global batch instead, so the queues
agree without any traffic. :meth:`MomentumTeacher.checkpoint_state` / :meth:`load_checkpoint_state`
carry the EMA weights and the queue through checkpoints (exact resume).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import ConfigError
from .model import Blip2Model

# What the momentum model owns (an EMA copy each); the rest of the model is shared.
MOMENTUM_MODULES: tuple[str, ...] = ("ln_vision", "qformer", "vision_proj", "text_proj")
MOMENTUM_PARAMETERS: tuple[str, ...] = ("query_tokens",)
NO_ID = torch.iinfo(torch.long).min  # queue entries enqueued without an image id: never a positive


def momentum_copy(model: Blip2Model) -> Blip2Model:
    """A ``Blip2Model`` of the same class whose :data:`MOMENTUM_MODULES` / :data:`MOMENTUM_PARAMETERS`
    are frozen deep copies and whose other parts are the online model's own objects, held as
    plain (unregistered) attributes: they are neither copied, nor moved, nor saved twice."""
    if not model.config.stage1_heads:
        raise ConfigError("momentum distillation needs the stage-1 heads (config.stage1_heads)")
    m = type(model).__new__(type(model))
    nn.Module.__init__(m)
    fresh = set(vars(m))
    for key, value in vars(model).items():
        if key not in fresh:  # plain attributes: config, tokenizers ...
            object.__setattr__(m, key, value)
    for name, child in model.named_children():
        if name in MOMENTUM_MODULES:
            m.add_module(name, copy.deepcopy(child))
        else:
            object.__setattr__(m, name, child)
    for name, p in model.named_parameters(recurse=False):
        if name in MOMENTUM_PARAMETERS:
            m.register_parameter(name, nn.Parameter(p.detach().clone(), requires_grad=False))
        else:
            object.__setattr__(m, name, p)
    for name, buf in model.named_buffers(recurse=False):
        object.__setattr__(m, name, buf)
    m.requires_grad_(False)
    m.training = model.training
    return m


class MomentumTeacher(nn.Module):
    """The EMA model and its feature queue. ``teacher.model`` computes momentum features;
    :meth:`update_` moves it towards the online model; :meth:`defer` / :meth:`flush_` enqueue
    a step's features once its optimizer step is done."""

    def __init__(self, online: Blip2Model, *, momentum: float = 0.995, queue_size: int = 0) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.model = momentum_copy(online)
        # (EMA parameter, online parameter) pairs, matched by name.
        self._pairs = [(p_m, online.get_parameter(n)) for n, p_m in self.model.named_parameters()]
        self.queue_size = queue_size
        q, e = online.num_query_tokens, online.config.embed_dim
        dev = online.query_tokens.device
        self.image_queue = torch.zeros(queue_size, q, e, device=dev)  # (N, Q, E)
        self.text_queue = torch.zeros(queue_size, e, device=dev)  # (N, E)
        self.id_queue = torch.full((queue_size,), NO_ID, dtype=torch.long, device=dev)  # (N,)
        self.queue_ptr = 0  # where the next entry goes
        self.queue_filled = 0  # entries written so far (at most queue_size)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def update_(self) -> None:
        """``p_m = m * p_m + (1 - m) * p`` for every EMA parameter (after an optimizer step)."""
        for p_m, p in self._pairs:
            p_m.mul_(self.momentum).add_(p.detach().to(p_m.dtype), alpha=1.0 - self.momentum)

    def queue(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled queue entries: image (n, Q, E), text (n, E), ids (n,), on ``device``."""
        if self.image_queue.device != device:
            self.image_queue, self.text_queue, self.id_queue = (
                t.to(device) for t in (self.image_queue, self.text_queue, self.id_queue))
        n = self.queue_filled
        return self.image_queue[:n], self.text_queue[:n], self.id_queue[:n]

    def defer(self, image_feats: torch.Tensor, text_feats: torch.Tensor, ids: torch.Tensor | None) -> None:
        """Remember a micro-step's global-batch momentum features for :meth:`flush_` (only
        while training, so an evaluation forward never enqueues)."""
        if self.queue_size and self.training:
            if ids is None:
                ids = torch.full((text_feats.shape[0],), NO_ID, dtype=torch.long, device=text_feats.device)
            self._pending.append((image_feats.detach(), text_feats.detach(), ids.detach().long()))

    @torch.no_grad()
    def flush_(self) -> None:
        """Enqueue what :meth:`defer` kept, oldest first (a ring buffer: the oldest entries go)."""
        for image_feats, text_feats, ids in self._pending:
            self.queue(image_feats.device)
            n = ids.shape[0]
            if n >= self.queue_size:  # a batch larger than the queue keeps its last entries
                image_feats, text_feats, ids, n = image_feats[-self.queue_size:], text_feats[-self.queue_size:], \
                    ids[-self.queue_size:], self.queue_size
            slots = (self.queue_ptr + torch.arange(n, device=ids.device)) % self.queue_size
            self.image_queue[slots] = image_feats.to(self.image_queue.dtype)
            self.text_queue[slots] = text_feats.to(self.text_queue.dtype)
            self.id_queue[slots] = ids
            self.queue_ptr = (self.queue_ptr + n) % self.queue_size
            self.queue_filled = min(self.queue_size, self.queue_filled + n)
        self._pending.clear()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The EMA weights (``model.<name>``) and the queue, as tensors (for safetensors)."""
        state = {f"model.{n}": p.detach().clone() for n, p in self.model.named_parameters()}
        if self.queue_size:
            state.update({"queue.image": self.image_queue.clone(), "queue.text": self.text_queue.clone(),
                          "queue.ids": self.id_queue.clone(),
                          "queue.position": torch.tensor([self.queue_ptr, self.queue_filled])})
        return state

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
        """Restore :meth:`checkpoint_state`; a state of another shape is refused, naming ``source``."""
        own = self.checkpoint_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
        if missing or unexpected or wrong:
            raise ConfigError(f"{source}: the momentum teacher's state does not fit this objective (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}): "
                              "momentum_queue_size or the model differ from the run that wrote it")
        for n, p in self.model.named_parameters():
            p.copy_(state[f"model.{n}"])
        if self.queue_size:
            dev = self.image_queue.device
            self.image_queue = state["queue.image"].to(dev, self.image_queue.dtype).clone()
            self.text_queue = state["queue.text"].to(dev, self.text_queue.dtype).clone()
            self.id_queue = state["queue.ids"].to(dev).clone()
            self.queue_ptr, self.queue_filled = (int(v) for v in state["queue.position"])
        self._pending.clear()


__all__ = ["MOMENTUM_MODULES", "MOMENTUM_PARAMETERS", "MomentumTeacher", "momentum_copy"]
