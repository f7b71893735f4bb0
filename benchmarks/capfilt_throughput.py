#!/usr/bin/env python
"""CapFilt (``qformer.capfilt``): images per second through captioning and filtering.

What is measured
    N synthetic 64 px PNGs with a web caption each (a .jsonl), run end to end through
    ``qformer.capfilt.run_capfilt`` in one process: read and decode (DataLoader workers), caption
    with a random BLIP-2 captioner (transformers' ``Blip2ForConditionalGeneration`` "small": ViT
    384 wide / 6 blocks / 224 px, Q-Former 4 layers / 32 queries, OPT 512 wide / 4 layers,
    loaded by ``Blip2.from_pretrained``), score with a random stage-1 filter (the image-search
    benchmark's model) and write the shards, ``capfilt.jsonl`` and the report.

    * BLIP mode: 1 caption per image (top-p 0.9, 30 new tokens at most), ITM >= 0.5;
    * BLIP-2 mode: 10 captions per image, best 2 by ITC;
    * the time inside captioning (``sample_captions``) and filtering (``score_pairs``) is
      recorded by wrapping them;
    * the per-caption seeded sampler against transformers' own sampling (``do_sample=True``, one
      global generator) on the same batch: what seeding every caption costs.

    Ranks scale linearly in principle: each rank captions and filters its own shards and writes
    its own shard files; nothing but a barrier is shared until rank 0 concatenates the shards
    (a few ms per thousand pairs). One process is measured here.

    python benchmarks/capfilt_throughput.py [--images 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def write_data(folder: Path, n: int) -> Path:
    """N 64 px PNGs of coloured rectangles and a data.jsonl naming each with a caption (seeded)."""
    from PIL import Image, ImageDraw

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        path = folder / "images" / f"img{i:05d}.png"
        if not path.exists():
            im = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(im)
            x, y = rng.randrange(40), rng.randrange(40)
            draw.rectangle([x, y, x + 20, y + 20], fill=tuple(rng.randrange(256) for _ in range(3)))
            im.save(path)
        rows.append({"image": f"images/{path.name}", "caption": f"a photo of rectangle number {i}"})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "data.jsonl"


def run(args) -> C.Section:
    import _models as M
    import torch

    import qformer.capfilt as CF
    from qformer import Blip2
    from qformer.generation import generate

    C.worker_setup()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_capfilt_"))
    M.small_hf_blip2(workdir / "captioner", "opt")
    captioner = Blip2.from_pretrained(workdir / "captioner").eval()
    filter_model = M.search_model(workdir / "filter")
    data = write_data(workdir / "data", args.images)

    inside = {"captioning": 0.0, "filtering": 0.0}
    originals = {"captioning": CF.sample_captions, "filtering": CF.score_pairs}

    def wrap(name):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return originals[name](*a, **kw)
            finally:
                inside[name] += time.perf_counter() - t
        return timed

    CF.sample_captions, CF.score_pairs = wrap("captioning"), wrap("filtering")
    results = {}
    try:
        for mode, cfg in {"blip": CF.CapFiltConfig(), "blip2": CF.CapFiltConfig.blip2()}.items():
            cfg.batch_size, cfg.num_workers, cfg.shard_size = args.batch_size, args.num_workers, args.shard_size
            # warm-up on a few images, then the timed run
            CF.run_capfilt(captioner, filter_model, str(data), workdir / f"warm-{mode}",
                           CF.CapFiltConfig(**{**vars(cfg), "shard_size": 4}), stop_after=1)
            for k in inside:
                inside[k] = 0.0
            out = workdir / f"out-{mode}"
            C.wait_for_quiet(args.quiet_wait)
            block = C.timed_block(lambda: CF.run_capfilt(captioner, filter_model, str(data), out, cfg), 1)
            report = json.loads((out / "capfilt_report.json").read_text())
            seconds = block["times"][0]
            results[mode] = dict(seconds=seconds, images_per_s=args.images / seconds, captions=cfg.num_captions,
                                 pairs=report["pairs"]["scored"], kept=report["pairs"]["kept"],
                                 captioning_s=inside["captioning"], filtering_s=inside["filtering"],
                                 foreign_cores=block["foreign_cores"])
            C.log(f"capfilt {mode}: {args.images / seconds:.2f} images/s")
    finally:
        CF.sample_captions, CF.score_pairs = originals["captioning"], originals["filtering"]

    # the seeded sampler against transformers' own sampling, on one batch of images
    px = captioner.vision.preprocess([str(p) for p in sorted((workdir / "data" / "images").glob("*.png"))[:args.batch_size]])
    cfg = CF.CapFiltConfig()
    sampler_s, plain_s = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        CF.sample_captions(captioner, px, list(range(len(px))), cfg)
        sampler_s.append(time.perf_counter() - t)
        torch.manual_seed(0)
        t = time.perf_counter()
        generate(captioner, vision_features=captioner.vision(px), num_beams=1, do_sample=True, top_p=cfg.top_p,
                 max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, batch_size=len(px))
        plain_s.append(time.perf_counter() - t)
    seeded, plain = min(sampler_s), min(plain_s)

    foreign = max(r["foreign_cores"] for r in results.values())
    sec = C.Section(
        title=f"CapFilt: captioning + filtering throughput ({args.images} images)",
        intro=(f"`qformer.capfilt.run_capfilt` end to end in one process on random models: captioner "
               f"{captioner.vision.describe()}, Q-Former {captioner.config.qformer.num_layers} layers / "
               f"{captioner.num_query_tokens} queries, OPT 512 wide / 4 layers (transformers' small BLIP-2, random, "
               f"loaded by `Blip2.from_pretrained`), filter: the image-search "
               f"benchmark's stage-1 model; {args.images} synthetic 64 px PNGs, batches of {args.batch_size} images, "
               f"{args.num_workers} DataLoader worker(s), shards of {args.shard_size}. CPU (lscpu): {C.cpu_model()}, "
               f"{os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}."),
        data=dict(images=args.images, modes=results, seeded_sampler_s=seeded, transformers_sampling_s=plain,
                  cpu=C.cpu_model(), foreign_cores=foreign),
    )
    sec.add_table("", ["mode", "captions / image", "images/s", "seconds", "captioning s", "filtering s",
                       "pairs scored", "kept"],
                  [[m, r["captions"], f"{r['images_per_s']:.2f}", f"{r['seconds']:.1f}", f"{r['captioning_s']:.1f}",
                    f"{r['filtering_s']:.1f}", r["pairs"], r["kept"]] for m, r in results.items()])
    sec.add_table(f"Seeding every caption (one batch of {len(px)} images, 1 caption each, best of {args.repeats}):",
                  ["sampling", "seconds"],
                  [["per-caption generators (CapFilt)", f"{seeded:.2f}"],
                   ["transformers' do_sample (one global generator)", f"{plain:.2f}"],
                   ["ratio", C.ratio(seeded, plain)]])
    sec.notes.append("Ranks scale linearly in principle: each rank captions, filters and writes its own shards "
                     "(shard % ranks); only a barrier and rank 0's concatenation of the shard files are shared.")
    sec.notes.append(f"other processes kept {foreign:.2f} cores busy during the timed runs (quiet: <= "
                     f"{C.QUIET_CORES}); absolute numbers on this shared machine are indicative only.")
    return sec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="sampler comparison repeats (default %(default)s)")
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="seconds to wait for other processes to go quiet before each timed block (default %(default)s)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    return C.run_and_save(run, args, "capfilt_throughput")


if __name__ == "__main__":
    main()
