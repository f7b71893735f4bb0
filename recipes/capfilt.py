"""CapFilt (BLIP's captioning and filtering): synthetic captions for every image, web and
synthetic captions filtered by a stage-1 model, written as a caption file training reads.

    python recipes/capfilt.py --captioner runs/toy/stage2/model --filter runs/toy/stage1/model \\
        --data web.jsonl --output-dir runs/capfilt
    accelerate launch recipes/capfilt.py ... --mode blip2          # ranks split the shards
    python recipes/stage1.py --train-data runs/capfilt/capfilt.jsonl   # pre-train on the result

--captioner  a stage-2 model (ours, or any BLIP-2 checkpoint Blip2.from_pretrained loads): writes
             --num-captions captions per image by nucleus sampling (top-p 0.9 after top-k 50, as
             transformers' and BLIP's sampling), with its
             training prompt; caption k of image i is drawn from its own seed (--seed, i, k), so
             the captions are the same whatever the number of ranks.
--filter     a stage-1 model with the ITC / ITM heads: scores every web caption and every
             synthetic caption against the image. A pair is kept when its ITM match probability
             is >= --itm-threshold and/or it is among its image's --itc-top-n candidates by ITC
             (--rule all: both rules; any: either).
--mode       blip   (default) BLIP's CapFilt: 1 caption per image, ITM >= 0.5.
             blip2  BLIP-2's bootstrapping: 10 captions per image, ranked with the web caption by
                    ITC, the best 2 kept (no ITM rule). Explicit flags override the mode.
--data       any dataset the training recipes read (.jsonl / .csv / imagefolder / webdataset
             shards / hub dataset, toy = the toy world's training split). The captions of one
             image share its image id; bad images and captions are skipped and counted as in
             training.

Writes to --output-dir:
  capfilt.jsonl          one row per kept pair: image (a path; in-memory images are written to
                         images/), caption, source (web | synthetic), itm, itc, image_id
  capfilt_report.json    images, pairs scored / kept / dropped per source, score summaries, the
                         data's skips by reason, a sample of dropped pairs
  capfilt_report.png     kept / dropped per source, ITM and ITC histograms
  shards/shard-NNNNN.json  every scored pair of --shard-size images, written atomically by the rank
                         that owns it (shard % ranks); a run started again skips finished shards
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qformer import Blip2
from qformer.adapters import resolve_value
from qformer.capfilt import CapFiltConfig, run_capfilt
from qformer.cli import run_main
from qformer.errors import ConfigError
from qformer.run import start_run

DEFAULTS = CapFiltConfig()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--captioner", type=Path, default=Path("runs/toy/stage2/model"),
                   help="the stage-2 model that writes captions (default: runs/toy/stage2/model)")
    g.add_argument("--filter", type=Path, default=Path("runs/toy/stage1/model"),
                   help="the stage-1 model with ITC / ITM heads that filters (default: runs/toy/stage1/model)")
    g.add_argument("--data", default="toy", help="the images and web captions (default: toy, the toy world's train split)")
    g.add_argument("--output-dir", type=Path, default=Path("runs/capfilt"), help="where to write (default: runs/capfilt)")
    g.add_argument("--image-column", default=None, help="the data's image column (default: found by name)")
    g.add_argument("--caption-column", default=None, help="the data's caption column (default: found by name)")
    g.add_argument("--split", default="train", help="hub datasets: the split (default: train)")
    g.add_argument("--streaming", action="store_true", help="read the data as a stream (files too large to hold)")
    c = p.add_argument_group("captioning")
    c.add_argument("--mode", choices=["blip", "blip2"], default="blip",
                   help="blip: 1 caption, ITM >= 0.5; blip2: 10 captions, the best 2 by ITC (default: blip)")
    c.add_argument("--num-captions", type=int, default=None, help="synthetic captions per image (default: the mode's)")
    c.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help=f"nucleus sampling (default: {DEFAULTS.top_p})")
    c.add_argument("--top-k", type=int, default=DEFAULTS.top_k,
                   help=f"only the k likeliest tokens, before top-p, as transformers' sampling (default: {DEFAULTS.top_k}; 0: off)")
    c.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="sampling temperature (default: 1)")
    c.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                   help=f"most tokens per caption (default: {DEFAULTS.max_new_tokens})")
    c.add_argument("--min-new-tokens", type=int, default=DEFAULTS.min_new_tokens,
                   help=f"fewest tokens per caption (default: {DEFAULTS.min_new_tokens}, as BLIP)")
    c.add_argument("--repetition-penalty", type=float, default=DEFAULTS.repetition_penalty,
                   help="transformers' repetition penalty (default: 1, none)")
    c.add_argument("--prompt", default=None, help="the captioner's text prompt (default: its training prompt)")
    c.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seeds every caption with the image's index (default: 0)")
    f = p.add_argument_group("filtering")
    f.add_argument("--itm-threshold", default=None, metavar="P",
                   help="keep pairs whose ITM match probability is >= this; 'off': no ITM rule (default: the mode's)")
    f.add_argument("--itc-top-n", type=int, default=None,
                   help="keep each image's N best candidates by ITC, web caption included; 0: off (default: the mode's)")
    f.add_argument("--rule", choices=["all", "any"], default=DEFAULTS.rule,
                   help="with both rules: keep pairs passing all (default) or any")
    w = p.add_argument_group("work")
    w.add_argument("--shard-size", type=int, default=DEFAULTS.shard_size,
                   help=f"images per shard, the unit of resumption and of rank assignment (default: {DEFAULTS.shard_size})")
    w.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help=f"images per pass (x num-captions generated rows) (default: {DEFAULTS.batch_size})")
    w.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images (default: 2)")
    w.add_argument("--stop-after", type=int, default=None,
                   help="each rank stops after N new shards (nothing concatenated; run again to go on)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.add_argument("--debug", action="store_true", help="show the full traceback of an error (also QFORMER_DEBUG=1)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> CapFiltConfig:
    base = CapFiltConfig.blip2() if args.mode == "blip2" else CapFiltConfig()
    changes = dict(top_p=args.top_p, top_k=args.top_k, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                   min_new_tokens=args.min_new_tokens, repetition_penalty=args.repetition_penalty, prompt=args.prompt,
                   seed=args.seed, rule=args.rule, shard_size=args.shard_size, batch_size=args.batch_size,
                   num_workers=args.num_workers)
    if args.num_captions is not None:
        changes["num_captions"] = args.num_captions
    if args.itm_threshold is not None:
        off = args.itm_threshold.lower() in ("off", "none")
        try:
            changes["itm_threshold"] = None if off else float(args.itm_threshold)
        except ValueError as exc:
            raise ConfigError(f"--itm-threshold must be a probability or 'off', got {args.itm_threshold!r}") from exc
    if args.itc_top_n is not None:
        changes["itc_top_n"] = args.itc_top_n
    config = CapFiltConfig(**{**vars(base), **changes})
    config.check()
    return config


def load_model(path: Path, flag: str) -> Blip2:
    if not path.exists():
        raise ConfigError(f"{flag} {path}: no model there (a saved model directory, a transformers BLIP-2 directory or a LAVIS .pth)")
    return Blip2.from_pretrained(path).eval()


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = config_from_args(args)
    run = start_run(args.output_dir, progress=not args.no_progress)
    data = "toy://data/train" if args.data == "toy" else args.data
    with run.accelerator.main_process_first():  # a plugin's data (the toy world's) is exported once
        spec = resolve_value(data, progress=run.progress)
    captioner = load_model(args.captioner, "--captioner").to(run.device)
    filter_model = captioner if args.filter.resolve() == args.captioner.resolve() else \
        load_model(args.filter, "--filter").to(run.device)
    options = {k: v for k, v in dict(image_column=args.image_column, caption_column=args.caption_column,
                                     split=args.split, streaming=args.streaming).items() if v is not None}
    run.print(f"CapFilt ({args.mode}): {config.num_captions} caption(s) per image by {args.captioner}, filtered by "
              f"{args.filter} (ITM >= {config.itm_threshold if config.itm_threshold is not None else 'off'}, ITC top {config.itc_top_n or 'off'}, rule {config.rule}); "
              f"{run.world_size} process(es)")
    result = run_capfilt(captioner, filter_model, spec, args.output_dir, config,
                         identity={"captioner": str(args.captioner.resolve()), "filter": str(args.filter.resolve())},
                         rank=run.rank, world_size=run.world_size, stop_after=args.stop_after, progress=run.progress,
                         **options)
    run.print(f"shards: {len(result.processed)} done by rank 0 now, {len(result.reused)} already finished, "
              f"{result.shards} in all")
    if result.report is not None:
        r = result.report
        pairs = r["pairs"]
        run.print(f"images: {r['images']['usable']} captioned of {r['images']['total']} "
                  f"({r['images']['skipped']} skipped: {r['data']['skipped']})")
        for source in ("web", "synthetic"):
            run.print(f"  {source}: {pairs[source]['kept']} kept of {pairs[source]['scored']}")
        run.print(f"wrote {args.output_dir / 'capfilt.jsonl'} ({pairs['kept']} pairs), capfilt_report.json, "
                  f"capfilt_report.png in {result.seconds:.0f} s")
    elif args.stop_after is not None:
        run.print(f"stopped after {args.stop_after} shard(s) per rank; run again to finish")
    run.accelerator.wait_for_everyone()
    return {"processed": result.processed, "reused": result.reused, "shards": result.shards}


if __name__ == "__main__":
    run_main(main)
