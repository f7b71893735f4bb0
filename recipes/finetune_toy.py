#!/usr/bin/env python
"""BLIP-2's fine-tuning on the toy world: what training the vision tower too buys.

    python recipes/finetune_toy.py                    # the README's table, seeds 0 1 2
    python recipes/finetune_toy.py --seeds 0 --rows caption-frozen caption-unfrozen

Starts from the toy runs of the README's first command (``runs/toy/stage1/model``,
``runs/toy/stage2/model``) and fine-tunes each for the same budget (300 steps of 64), the tower
frozen or trained (all 4 blocks and the embeddings, fp32 weights under bf16 autocast):

* ``caption-*``:   stage 2 on the toy training captions, lr 2e-4 (warm-up 30 steps), as the
                   paper's caption fine-tuning (its prompt "a photo of" is not in the toy LM's
                   language, so the toy card's empty prompt stays); evaluated as stage 2 (CIDEr and
                   whether each object's shape, colour and size is named, 300 held-out images);
* ``retrieval-*``: stage 1 (ITC + ITM + ITG) on every scene's five paraphrases, one row each with
                   the scene's image id (COCO's layout: all captions of an image are its ITC
                   positives and never its ITM negatives), lr 1e-4 (warm-up 30), tower layer decay
                   0.95 as the paper's retrieval fine-tuning; evaluated as stage 1 (ITC R@1, and
                   ITC top-16 + ITM re-rank R@1, 500 held-out images).

Each run writes to ``--root/ft-<row>-s<seed>`` and is skipped when its ``results.json`` exists,
so a killed experiment resumes where it stopped. The table (min / median / max over seeds,
beside the starting models' own figures) goes to ``--root/finetune_table.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = ("caption-frozen", "caption-unfrozen", "retrieval-frozen", "retrieval-unfrozen")
RECIPES = Path(__file__).resolve().parent
STEPS = 300
CAPTION_METRICS = ("CIDEr", "toy_shape_recall", "toy_colour_recall", "toy_size_recall", "toy_exact")
RETRIEVAL_METRICS = ("itc_i2t_r1", "itc_t2i_r1", "i2t_r1", "t2i_r1")


def toy_train_metadata() -> str:
    """The toy training split's ``metadata.jsonl`` (exported once by the toy plugin)."""
    from qformer.toy.experiments import card_resource

    return card_resource("data/train.jsonl")


def scores(out: Path, kind: str) -> dict[str, float]:
    r = json.loads((out / "results.json").read_text())["results"]
    if kind == "caption":
        c = r["captioning"]
        return {m: float(c[m]) * (1.0 if m == "CIDEr" else 100.0) for m in CAPTION_METRICS}
    return {m: float(r["retrieval"][m]) for m in RETRIEVAL_METRICS}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--root", type=Path, default=Path("runs/toy"),
                   help="where the starting toy runs are and the fine-tuning runs go (default runs/toy)")
    args = p.parse_args(argv)
    from qformer.toy.experiments import paraphrase_file, run_recipe, spread  # after --help: imports torch

    root, logs = args.root, args.root / "finetune-logs"
    start = {"caption": root / "stage2", "retrieval": root / "stage1"}
    for kind, run in start.items():
        if any(r.startswith(kind) for r in args.rows) and not (run / "model").is_dir():
            p.error(f"{run / 'model'} not found: run the toy world first (python recipes/stage1.py && python "
                    f"recipes/stage2.py), or pass --root")

    common = ["--max-steps", str(STEPS), "--save-every", str(STEPS), "--warmup-steps", "30", "--min-lr", "1e-5"]
    unfrozen = ["--vision-trainable-blocks", "-1", "--cache-features", "false"]
    paraphrases = None
    results: dict[str, dict[int, dict[str, float]]] = {}
    for seed in args.seeds:
        for row in args.rows:
            kind, tower = row.split("-")
            if kind == "caption":
                cmd = [str(RECIPES / "stage2.py"), "--init-from", str(start[kind] / "model"), *common, "--lr", "2e-4"]
            else:
                paraphrases = paraphrases or paraphrase_file(toy_train_metadata(), root / "paraphrases" / "train.jsonl")
                cmd = [str(RECIPES / "stage1.py"), "--init-from", str(start[kind] / "model"), "--train-data",
                       str(paraphrases), *common, "--lr", "1e-4", "--loss-ramp-steps", "0"]
                if tower == "unfrozen":
                    cmd += ["--vision-layer-decay", "0.95"]
            if tower == "unfrozen":
                cmd += unfrozen
            out = root / f"ft-{row}-s{seed}"
            run_recipe([*cmd, "--seed", str(seed), "--output-dir", str(out)], out, logs / f"ft-{row}-s{seed}.log")
            results.setdefault(row, {})[seed] = scores(out, kind)

    lines: list[str] = []
    caption_rows = [r for r in args.rows if r.startswith("caption")]
    if caption_rows:
        s = scores(start["caption"], "caption")
        lines += [f"| caption fine-tuning ({STEPS} steps of 64) | CIDEr | shape named % | colour named % | "
                  "size named % | all objects exact % |", "|---|---|---|---|---|---|",
                  f"| start: the toy stage-2 model | {s['CIDEr']:.2f} | "
                  + " | ".join(f"{s[m]:.1f}" for m in CAPTION_METRICS[1:]) + " |"]
        for row in caption_rows:
            per = list(results[row].values())
            lines.append(f"| tower {row.split('-')[1]} | {spread([x['CIDEr'] for x in per], 2)} | "
                         + " | ".join(spread([x[m] for x in per]) for m in CAPTION_METRICS[1:]) + " |")
        lines.append("")
    retrieval_rows = [r for r in args.rows if r.startswith("retrieval")]
    if retrieval_rows:
        s = scores(start["retrieval"], "retrieval")
        lines += [f"| retrieval fine-tuning ({STEPS} steps of 64, image ids) | ITC R@1 i->t / t->i | "
                  "ITC + ITM re-rank R@1 i->t / t->i |", "|---|---|---|",
                  f"| start: the toy stage-1 model | {s['itc_i2t_r1']:.1f} / {s['itc_t2i_r1']:.1f} | "
                  f"{s['i2t_r1']:.1f} / {s['t2i_r1']:.1f} |"]
        for row in retrieval_rows:
            per = list(results[row].values())
            col = lambda a, b: f"{spread([x[a] for x in per])} and {spread([x[b] for x in per])}"  # noqa: E731
            lines.append(f"| tower {row.split('-')[1]} | {col('itc_i2t_r1', 'itc_t2i_r1')} | {col('i2t_r1', 't2i_r1')} |")
    table = "\n".join(lines).strip()
    print(f"\nmin / median / max over seeds {args.seeds}:\n\n{table}")
    (root / "finetune_table.md").write_text(table + "\n")
    (root / "finetune_table.json").write_text(json.dumps({"seeds": args.seeds, "steps": STEPS, "results": results},
                                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
