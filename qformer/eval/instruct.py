"""Instruction tuning's report: held-out VQA exact match per question type for the
instruction-tuned model, the BLIP-2 model it started from (zero-shot) and an image-blind baseline.

The blind baseline answers every question of a type with one fixed answer: the single answer
that scores best on that type's held-out questions themselves. No model that ignores the image
can beat it on those questions, so "above the blind baseline" means the image was used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .tasks import VQAQuestion
from .vqa import normalize_answer

#: The prompt instruction-tuned models are asked with (one of InstructBLIP's VQA templates,
#: BLIP-2's T5 zero-shot prompt).
INSTRUCT_VQA_TEMPLATE = "Question: {} Short answer:"
ALL = "all"


def _types(questions: Sequence[VQAQuestion]) -> dict[str, list[VQAQuestion]]:
    out: dict[str, list[VQAQuestion]] = {}
    for q in questions:
        out.setdefault(q.question_type or ALL, []).append(q)
    return out


def image_blind_baseline(questions: Sequence[VQAQuestion]) -> dict[str, float]:
    """Exact match (%) per question type (and ``all``) of the best fixed answer per type."""
    out: dict[str, float] = {}
    hits_total = 0
    for qtype, qs in _types(questions).items():
        sets = [{normalize_answer(a) for a in q.answers} for q in qs]
        counts = Counter(a for s in sets for a in s)
        best = max(counts.values()) if counts else 0
        out[qtype] = 100.0 * best / len(qs)
        hits_total += best
    out[ALL] = 100.0 * hits_total / len(questions)
    return out


@dataclass
class ComparisonTable:
    """Rows: question types then ``all``; columns: the runs compared (exact match, %)."""

    rows: list[str]
    columns: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def markdown(self) -> str:
        names = list(self.columns)
        lines = ["| question type | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for r in self.rows:
            cells = [f"{self.columns[c][r]:.1f}" if r in self.columns[c] else "-" for c in names]
            lines.append(f"| {r} | {self.counts.get(r, 0)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def flat(self) -> dict[str, float]:
        """``{"table/COLUMN/ROW": value}`` for results.json."""
        return {f"table/{c}/{r}": v for c, col in self.columns.items() for r, v in col.items()}


def _per_type(metrics: Mapping[str, float]) -> dict[str, float]:
    out = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("exact_match/")}
    if "exact_match" in metrics:
        out[ALL] = float(metrics["exact_match"])
    return out


def comparison_table(
    questions: Sequence[VQAQuestion],
    *,
    tuned: Mapping[str, float],
    zero_shot: Mapping[str, float] | None,
    blind: Mapping[str, float],
) -> ComparisonTable:
    """The three columns side by side (``tuned`` / ``zero_shot``: :func:`evaluate_vqa` metrics)."""
    groups = _types(questions)
    rows = sorted(k for k in groups if k != ALL) + [ALL]
    table = ComparisonTable(rows=rows, counts={k: len(v) for k, v in groups.items()} | {ALL: len(questions)})
    table.columns["instruction-tuned"] = _per_type(tuned)
    if zero_shot is not None:
        table.columns["BLIP-2 zero-shot"] = _per_type(zero_shot)
    table.columns["image-blind"] = dict(blind)
    return table


__all__ = ["ALL", "INSTRUCT_VQA_TEMPLATE", "ComparisonTable", "comparison_table", "image_blind_baseline"]
