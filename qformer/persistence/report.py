"""Strict loading into a model, with a report of what was loaded, initialised fresh or dropped.

Loads are strict by default: every key of the model must be provided and every key of the
file must be used, except keys a format is known not to carry (they are initialised fresh
and listed, with the reason) or known to carry redundantly (tied copies, buffers: listed as
dropped). Shapes are checked against the model before any weight is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError
from .keymaps import Converted

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def summarise(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


@dataclass
class LoadReport:
    """What a load did, key by key. ``str(report)`` is the log a recipe prints."""

    source: str
    missing: list[str] = field(default_factory=list)  # model keys the file lacks (an error when strict)
    unexpected: list[str] = field(default_factory=list)  # file keys with no place in the model (error when strict)
    fresh: dict[str, str] = field(default_factory=dict)  # model keys left at their random init, with why
    elsewhere: dict[str, str] = field(default_factory=dict)  # model keys loaded from another source (named)
    dropped: dict[str, str] = field(default_factory=dict)  # file keys deliberately unused, with the reason
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    @property
    def initialized(self) -> dict[str, str]:
        """Every model key not taken from this file (fresh or from elsewhere), with the reason."""
        return {**self.elsewhere, **self.fresh}

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for title, table in (("loaded from elsewhere", self.elsewhere),
                             ("freshly initialised", self.fresh), ("ignored", self.dropped)):
            groups: dict[str, list[str]] = {}
            for k, why in table.items():
                groups.setdefault(why, []).append(k)
            for why, keys in groups.items():
                lines.append(f"{title}: {why}: {summarise(keys)}")
        return "\n".join(lines)


def load_into(
    module: "nn.Module",
    converted: Converted,
    *,
    source: str,
    strict: bool = True,
    fresh_ok: dict[str, str] | None = None,
    elsewhere: dict[str, str] | None = None,
) -> LoadReport:
    """Copy ``converted.state_dict`` into ``module`` after checking names and shapes.

    Keys the source format is known not to carry are reported, not treated as missing:
    ``fresh_ok`` maps key prefixes that keep their random initialisation to the reason (e.g.
    "new in stage 2"); ``elsewhere`` maps key prefixes already loaded from another source to
    that source (e.g. "frozen LLM from facebook/opt-2.7b").
    """
    report = LoadReport(source=source, dropped=dict(converted.dropped))
    own = module.state_dict()
    sd = converted.state_dict
    report.unexpected = sorted(set(converted.unrecognised) | (set(sd) - set(own)))
    for key in sorted(set(own) - set(sd)):
        for table, target in ((elsewhere or {}, report.elsewhere), (fresh_ok or {}, report.fresh)):
            why = next((r for p, r in table.items() if key.startswith(p)), None)
            if why is not None:
                target[key] = why
                break
        else:
            report.missing.append(key)
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"{source}: shapes do not match the config:\n  " + "\n  ".join(mismatched))
    if strict and not report.ok:
        raise CheckpointError(f"{source}: strict load failed\n{report}")
    usable = {k: v for k, v in sd.items() if k in own}
    with torch.no_grad():
        for k, v in usable.items():
            own[k].copy_(v)
    report.loaded = len(usable)
    return report


__all__ = ["LoadReport", "load_into", "summarise"]
