"""Hooks through which a world of its own (the built-in toy world, or a user's) plugs into the
library without the library importing it.

Two hooks:

* **Resource schemes.** An adapter card value ``"SCHEME://NAME"`` stands for something a plugin
  provides (a cached backbone's path, an exported dataset, a config dict). When a card is
  resolved (:func:`qformer.adapters.resolve_resources`), every such value is replaced by what the
  scheme's resolver returns. The card's ``plugins.SCHEME`` section is passed to the resolver as
  its options.
* **Caption scorers.** Extra per-image caption metrics for evaluation data the plugin knows (the
  toy world scores whether a caption names each object's shape, colour and size). Evaluation
  asks every scorer for references of its eval set; a scorer that does not know the data
  returns None and is not used.

Plugins are found once, on first use: the built-in ones (named below, imported by name), then
any installed package's entry points in the group ``qformer.plugins``. Each is a function
``register(registry: PluginRegistry) -> None``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConfigError

#: ``module:function`` of the plugins that ship with qformer.
BUILTIN_PLUGINS: tuple[str, ...] = ("qformer.toy.plugin:register",)
ENTRY_POINT_GROUP = "qformer.plugins"


class ResourceResolver(Protocol):
    def __call__(self, names: set[str], options: dict[str, Any], *, progress: bool) -> dict[str, Any]:
        """Values for ``names`` (the part after ``SCHEME://``); may prepare them first (train,
        download, export), which is why a run calls resolvers on one process first."""


class CaptionScorer(Protocol):
    """Per-image caption metrics for data a plugin knows; metric keys become ``{name}_{key}``."""

    name: str

    def references(self, spec: Any, image_ids: Sequence[Hashable]) -> list[Any] | None:
        """Per image, what a caption of it is checked against; None if this is not the plugin's data."""

    def score(self, caption: str, reference: Any) -> dict[str, float]:
        """Metrics of one caption against its image's reference (each in [0, 1])."""


@dataclass
class PluginRegistry:
    schemes: dict[str, ResourceResolver] = field(default_factory=dict)
    caption_scorers: list[CaptionScorer] = field(default_factory=list)

    def add_scheme(self, name: str, resolver: ResourceResolver) -> None:
        if not name.isidentifier():
            raise ValueError(f"a resource scheme name must be an identifier, got {name!r}")
        self.schemes[name] = resolver

    def add_caption_scorer(self, scorer: CaptionScorer) -> None:
        self.caption_scorers.append(scorer)


_REGISTRY: PluginRegistry | None = None
_LOCK = threading.Lock()


def _load(spec: str) -> Callable[[PluginRegistry], None]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "register")


def registry() -> PluginRegistry:
    """The registry, with every plugin registered (loaded once per process)."""
    global _REGISTRY
    with _LOCK:
        if _REGISTRY is None:
            reg = PluginRegistry()
            for spec in BUILTIN_PLUGINS:
                _load(spec)(reg)
            from importlib.metadata import entry_points

            for ep in entry_points(group=ENTRY_POINT_GROUP):
                if f"{ep.module}:{ep.attr}" not in BUILTIN_PLUGINS:
                    ep.load()(reg)
            _REGISTRY = reg
        return _REGISTRY


def resolver(scheme: str) -> ResourceResolver:
    """The resolver of ``scheme``; a clear error naming the known schemes otherwise."""
    schemes = registry().schemes
    if scheme not in schemes:
        raise ConfigError(f"no plugin provides {scheme}:// values (known schemes: {sorted(schemes) or 'none'})")
    return schemes[scheme]


def caption_scorers() -> list[CaptionScorer]:
    return list(registry().caption_scorers)


__all__ = [
    "BUILTIN_PLUGINS",
    "CaptionScorer",
    "ENTRY_POINT_GROUP",
    "PluginRegistry",
    "ResourceResolver",
    "caption_scorers",
    "registry",
    "resolver",
]
