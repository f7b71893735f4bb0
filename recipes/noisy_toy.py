#!/usr/bin/env python
"""Noisy web-like data on the toy world: what momentum distillation and CapFilt buy back.

    python recipes/noisy_toy.py                       # the README's four-row table, seeds 0 1 2
    python recipes/noisy_toy.py --seeds 0 --rows noisy clean

Four stage-1 runs per seed, each with the toy card's budget (550 steps of 64), evaluated on the
clean held-out split (ITC, and ITC top-16 + ITM re-rank, R@1 both ways):

(a) ``noisy``:    ``toy://noisy/train.jsonl`` -- the training split with ``--noise`` of its
                  captions corrupted (half another scene's caption, half one fact wrong;
                  ``qformer.toy.noise``);
(b) ``noisy-md``: the same data with momentum distillation (ALBEF: EMA teacher, alpha 0.4
                  ramped in over the first 150 steps, as the ITM / ITG losses ramp in);
(c) ``capfilt``:  stage 1 from scratch on CapFilt's output for the noisy data. As BLIP
                  fine-tunes both models on COCO, the filter is the seed-0 ``noisy`` model
                  fine-tuned on a small clean subset (``toy://clean/train.jsonl``, the first 10 %
                  of the scenes; 300 steps of stage 1) and the captioner is a stage-2 model
                  trained from the filter on the same subset; one CapFilt pass serves every seed;
(d) ``clean``:    the clean training split (``python recipes/stage1.py`` itself).

Each run writes to ``--root/<row>-s<seed>`` (beside the toy runs, so the frozen tower's feature
cache is shared) and is skipped when its ``results.json`` exists, so a killed experiment resumes
where it stopped. The table (min / median / max over seeds) and the filter's precision and
recall at catching the corrupted web captions go to ``--root/noisy_table.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = ("noisy", "noisy-md", "capfilt", "clean")
LABELS = {
    "noisy": "(a) noisy captions",
    "noisy-md": "(b) noisy + momentum distillation",
    "capfilt": "(c) CapFilt on the noisy captions",
    "clean": "(d) clean captions",
}
METRICS = ("itc_i2t_r1", "itc_t2i_r1", "i2t_r1", "t2i_r1")
RECIPES = Path(__file__).resolve().parent


def filter_quality(noisy_jsonl: str, capfilt_jsonl: Path) -> dict[str, float]:
    """How well the filter caught the corrupted web captions: a web caption counts as flagged
    when CapFilt dropped it. Precision = corrupted among flagged, recall = flagged among corrupted."""
    rows = [json.loads(x) for x in Path(noisy_jsonl).read_text().splitlines() if x.strip()]
    root = Path(noisy_jsonl).parent
    kept = set()
    for line in capfilt_jsonl.read_text().splitlines():
        r = json.loads(line)
        if r.get("source") == "web":
            kept.add(str(Path(r["image"]).resolve()))
    corrupted = {str((root / r["file_name"]).resolve()) for r in rows if r["noise"] != "clean"}
    flagged = {str((root / r["file_name"]).resolve()) for r in rows} - kept
    hit = len(corrupted & flagged)
    out = {"web_rows": len(rows), "corrupted": len(corrupted), "flagged": len(flagged),
           "precision": 100.0 * hit / max(len(flagged), 1), "recall": 100.0 * hit / max(len(corrupted), 1)}
    for kind in ("swapped", "altered"):
        of_kind = {str((root / r["file_name"]).resolve()) for r in rows if r["noise"] == kind}
        out[f"recall_{kind}"] = 100.0 * len(of_kind & flagged) / max(len(of_kind), 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--noise", type=float, default=0.4, help="fraction of corrupted training captions (default 0.4)")
    p.add_argument("--root", type=Path, default=Path("runs/toy"), help="where the runs go (default runs/toy)")
    p.add_argument("--prepare-only", action="store_true",
                   help="only CapFilt's filter, captioner and pass over the noisy data (row c's data), no table")
    args = p.parse_args(argv)
    from qformer.toy.experiments import card_resource, run_recipe as run, spread

    stage1, stage2, capfilt = (str(RECIPES / f"{n}.py") for n in ("stage1", "stage2", "capfilt"))
    root, logs = args.root, args.root / "noisy-logs"
    noisy = ["--train-data", "toy://noisy/train.jsonl", "--set", f"plugins.toy.noise={args.noise}"]

    quality = None
    if "capfilt" in args.rows:  # captioner and filter first, once
        base = run([stage1, *noisy, "--seed", "0", "--output-dir", str(root / "noisy-s0")], root / "noisy-s0",
                   logs / "noisy-s0.log")
        filt = run([stage1, "--init-from", str(base / "model"), "--train-data", "toy://clean/train.jsonl",
                    "--max-steps", "300", "--warmup-steps", "0", "--loss-ramp-steps", "0", "--save-every", "300",
                    "--output-dir", str(root / "capfilt-filter")], root / "capfilt-filter", logs / "capfilt-filter.log")
        capt = run([stage2, "--init-from", str(filt / "model"), "--train-data", "toy://clean/train.jsonl",
                    "--output-dir", str(root / "capfilt-captioner")], root / "capfilt-captioner",
                   logs / "capfilt-captioner.log")
        data = card_resource("noisy/train.jsonl", [f"plugins.toy.noise={args.noise}"])
        out = run([capfilt, "--captioner", str(capt / "model"), "--filter", str(filt / "model"), "--data", data,
                   "--output-dir", str(root / "capfilt-data")], root / "capfilt-data", logs / "capfilt-data.log")
        quality = filter_quality(data, out / "capfilt.jsonl")
        print(f"filter on the noisy web captions: {quality}")
    if args.prepare_only:
        return

    results: dict[str, dict[int, dict[str, float]]] = {}
    for seed in args.seeds:
        for row in args.rows:
            extra = {"noisy": noisy, "clean": [],
                     "noisy-md": [*noisy, "--momentum-distill", "true", "--momentum-alpha-ramp-steps", "150"],
                     "capfilt": ["--train-data", str(root / "capfilt-data" / "capfilt.jsonl")]}[row]
            out = run([stage1, *extra, "--seed", str(seed), "--output-dir", str(root / f"{row}-s{seed}")],
                      root / f"{row}-s{seed}", logs / f"{row}-s{seed}.log")
            r = json.loads((out / "results.json").read_text())["results"]["retrieval"]
            results.setdefault(row, {})[seed] = {m: r[m] for m in METRICS}

    lines = ["| training data (stage 1, 550 steps of 64) | ITC R@1 i->t / t->i | ITC + ITM re-rank R@1 i->t / t->i |",
             "|---|---|---|"]
    for row in args.rows:
        per = results[row].values()
        col = lambda a, b: f"{spread([x[a] for x in per])} and {spread([x[b] for x in per])}"  # noqa: E731
        lines.append(f"| {LABELS[row]} | {col('itc_i2t_r1', 'itc_t2i_r1')} | {col('i2t_r1', 't2i_r1')} |")
    table = "\n".join(lines)
    if quality:
        table += (f"\n\nFilter on the {quality['web_rows']:,} web captions ({quality['corrupted']:,} corrupted): "
                  f"dropped {quality['flagged']:,}; precision {quality['precision']:.1f} %, recall "
                  f"{quality['recall']:.1f} % (swapped {quality['recall_swapped']:.1f} %, altered "
                  f"{quality['recall_altered']:.1f} %).")
    print(f"\nmin / median / max over seeds {args.seeds}, {args.noise:.0%} noise:\n\n{table}")
    (root / "noisy_table.md").write_text(table + "\n")
    (root / "noisy_table.json").write_text(json.dumps({"seeds": args.seeds, "noise": args.noise, "results": results,
                                                       "filter": quality}, indent=2) + "\n")


if __name__ == "__main__":
    main()
