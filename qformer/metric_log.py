"""Training metrics: one JSON object per logged step in ``metrics.jsonl``, and the loss curve.

``metrics.jsonl`` is strict JSON: a non-finite value (a NaN or infinite loss, logged on the
step where training stopped for it) is written as ``null``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .io import atomic_write_text, json_safe


class MetricLog:
    """Appends metrics to ``metrics.jsonl`` and draws ``loss_curve.png`` (main process only)."""

    def __init__(self, output_dir: Path, *, enabled: bool = True, resume_step: int = 0) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and self.path.is_file():
            # A resumed run drops what was logged after its checkpoint.
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(l + "\n" for l in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(json_safe({"step": step, **values}), allow_nan=False) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]

    def last(self, prefix: str) -> dict[str, Any]:
        """The most recent record with ``prefix`` keys, those keys only (prefix removed)."""
        rows = [r for r in self.records() if any(k.startswith(prefix) for k in r)]
        return {k.removeprefix(prefix): v for k, v in rows[-1].items() if k.startswith(prefix)} if rows else {}

    def plot(self, png: Path, *, title: str, spans: list[tuple[int, int, str]] = ()) -> Path | None:
        """Every ``loss*`` series against the step; ``spans`` shade step ranges with a label
        (e.g. where loss weights ramp in, so a rising total there is read for what it is)."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.records()
        keys = sorted({k for r in rows for k in r if k.startswith("loss")})
        if not keys:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
        for start, end, label in spans:
            ax.axvspan(start, end, color="tab:gray", alpha=0.15, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        plt.close(fig)
        return png


__all__ = ["MetricLog"]
