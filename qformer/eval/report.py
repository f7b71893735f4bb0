"""Write evaluation results: JSON for machines, a Markdown table for people.

Results are ``{task: {metric: number}}`` (e.g. ``{"coco_caption": caption_metrics(...),
"vqav2": vqa_score(...), "coco_retrieval": evaluate_retrieval(...)}``). The result objects
of this package are dicts of floats with extra information (skipped metrics, notices, k, ...)
exposed by a ``metadata()`` method; that goes into the JSON under ``"meta"`` and into the
Markdown under "Notes", so a skipped SPICE is never silently absent.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, TextIO

from ..io import atomic_write_text

Results = Mapping[str, Mapping[str, Any]]


def _number(value: Any) -> float | int | None:
    """JSON has no NaN/inf: write them as null (strict parsers reject NaN)."""
    if isinstance(value, bool):
        return int(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def results_to_json(results: Results, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"results": {task: {metric: number}}, "meta": {task: {...}}, **extra}``."""
    out: dict[str, Any] = {"results": {}, "meta": {}}
    for task, metrics in results.items():
        out["results"][task] = {str(k): _number(v) for k, v in metrics.items()}
        meta = getattr(metrics, "metadata", None)
        if callable(meta):
            out["meta"][task] = meta()
    if not out["meta"]:
        del out["meta"]
    if extra:
        out.update(dict(extra))
    return out


def _format_value(value: Any, precision: int) -> str:
    v = _number(value)
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{precision}f}"


def format_table(results: Results, *, precision: int = 2, markdown: bool = True) -> str:
    """One row per (task, metric). ``markdown=False`` gives aligned plain text."""
    rows = [
        (task, str(metric), _format_value(value, precision))
        for task, metrics in results.items()
        for metric, value in metrics.items()
    ]
    header = ("task", "metric", "value")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "| --- | --- | ---: |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = lambda r: "  ".join((c.rjust(w) if i == 2 else c.ljust(w)) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


def format_grid(results: Results, *, precision: int = 2, row_title: str = "") -> str:
    """One row per task, one column per metric (the union, in first-seen order): a compact
    markdown table for results that share their metric names (e.g. retrieval settings)."""
    columns: list[str] = []
    for metrics in results.values():
        columns += [str(m) for m in metrics if str(m) not in columns]
    lines = ["| " + " | ".join([row_title, *columns]) + " |", "| --- |" + " ---: |" * len(columns)]
    for task, metrics in results.items():
        cells = [_format_value(metrics[c], precision) if c in metrics else "" for c in columns]
        lines.append("| " + " | ".join([str(task), *cells]) + " |")
    return "\n".join(lines)


def _notes(results: Results) -> list[str]:
    notes = []
    for task, metrics in results.items():
        for name, why in (getattr(metrics, "skipped", None) or {}).items():
            notes.append(f"{task}: {name} skipped: {why}")
        for note in getattr(metrics, "notices", None) or []:
            if " skipped: " not in note:
                notes.append(f"{task}: {note}")
    return notes


def format_report(results: Results, *, title: str = "Evaluation results", precision: int = 2) -> str:
    """The Markdown document :func:`write_results` writes: a title, the table, the notes."""
    parts = [f"# {title}", "", format_table(results, precision=precision), ""]
    notes = _notes(results)
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


def write_results(
    results: Results,
    output_dir: str | os.PathLike,
    *,
    name: str = "results",
    title: str = "Evaluation results",
    extra: Mapping[str, Any] | None = None,
    precision: int = 2,
) -> dict[str, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``output_dir`` (created if needed).

    ``extra`` (e.g. the checkpoint path, the step, the config) is added at the top level of
    the JSON. Returns ``{"json": path, "markdown": path}``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    payload = results_to_json(results, extra=extra)
    atomic_write_text(json_path, json.dumps(payload, indent=2, sort_keys=False, allow_nan=False, default=str) + "\n")
    atomic_write_text(md_path, format_report(results, title=title, precision=precision))
    return {"json": json_path, "markdown": md_path}


def print_table(results: Results, *, precision: int = 2, file: TextIO | None = None) -> None:
    """Print the results as an aligned plain-text table (and any notes) to stdout."""
    stream = file if file is not None else sys.stdout
    print(format_table(results, precision=precision, markdown=False), file=stream)
    for note in _notes(results):
        print(f"note: {note}", file=stream)


__all__ = ["format_grid", "format_report", "format_table", "print_table", "results_to_json", "write_results"]
