"""Search your own images by text with a stage-1 model: build an index once, query it.

    python recipes/search.py build --images my_photos/ --index my_photos.index       # runs/toy/stage1/model
    python recipes/search.py build --images my_photos/ --index my_photos.index       # again: only new / changed images
    python recipes/search.py query --index my_photos.index "a dog on a sofa" "a red car" --k 5
    accelerate launch recipes/search.py build --model M --images data.jsonl --index out.index   # ranks split the images

build   every image of a folder (by suffix, recursively), or of any dataset the training recipes
        read (.jsonl / .csv / webdataset shards / a hub dataset / toy = the toy world's held-out
        split): its ITC features (the normalised query embeddings) go to INDEX/features.safetensors,
        the images' keys, paths and stamps (size + modification time) to INDEX/index.json. Run it
        again and only new or changed images are encoded (removed ones are dropped); --rebuild
        encodes everything. Unreadable images are skipped and listed.
query   for each text: the ITC top --rerank images (a matrix product, or --backend faiss for large
        collections: pip install 'qformer[search]'), re-read and re-ranked by ITM + ITC as in
        retrieval evaluation; the best --k are printed (--rerank 0: ITC alone, no image is read).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qformer import Blip2
from qformer.adapters import resolve_value
from qformer.cli import run_main
from qformer.errors import ConfigError
from qformer.run import start_run
from qformer.search import ImageIndex, update_index

DEFAULT_MODEL = Path("runs/toy/stage1/model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"a stage-1 model directory (Blip2.from_pretrained) (default: {DEFAULT_MODEL})")
    common.add_argument("--index", type=Path, required=True, help="the index folder")
    common.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error (also QFORMER_DEBUG=1)")
    b = sub.add_parser("build", parents=[common], help="index (or update the index of) a folder or dataset")
    b.add_argument("--images", required=True,
                   help="a folder of images, or any dataset the recipes read (.jsonl, .csv, shards, hub name, toy)")
    b.add_argument("--rebuild", action="store_true", help="encode every image, not only new or changed ones")
    b.add_argument("--num-workers", type=int, default=1, help="DataLoader workers reading images (default: 1)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    q = sub.add_parser("query", parents=[common], help="the best images for each text")
    q.add_argument("texts", nargs="+", help="what to look for")
    q.add_argument("--k", type=int, default=5, help="results per text (default: 5)")
    q.add_argument("--rerank", type=int, default=16,
                   help="ITC candidates re-ranked by ITM per text (default: 16; 0: ITC alone)")
    q.add_argument("--backend", choices=["torch", "faiss"], default="torch",
                   help="ITC top-k by a matrix product or a faiss index (default: torch)")
    q.add_argument("--faiss-factory", default="Flat",
                   help="faiss.index_factory string (default: Flat, exact; e.g. HNSW32: approximate, faster)")
    q.add_argument("--json", action="store_true", help="print the hits as JSON")
    return p.parse_args(argv)


def load_model(path: Path) -> Blip2:
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {path}: no model there (a directory with config.json)")
    return Blip2.from_pretrained(path).eval()


def build(args: argparse.Namespace) -> dict:
    run = start_run(args.index, progress=not args.no_progress)
    images = "toy://data/val" if args.images == "toy" else args.images
    with run.accelerator.main_process_first():  # a plugin's data (the toy world's) is exported once
        spec = resolve_value(images, progress=run.progress)
    model = load_model(args.model).to(run.device)
    index, stats = update_index(model, spec, args.index, rebuild=args.rebuild, batch_size=args.batch_size,
                                num_workers=args.num_workers, rank=run.rank, world_size=run.world_size,
                                progress=run.progress)
    run.print(f"index {args.index}: {len(index)} images ({stats.encoded} encoded, {stats.kept} unchanged, "
              f"{stats.removed} removed, {len(stats.skipped)} unreadable{', model changed: rebuilt' if stats.rebuilt else ''})")
    for key, why in list(stats.skipped.items())[:10]:
        run.print(f"  skipped {key}: {why}")
    run.accelerator.wait_for_everyone()
    return {"images": len(index), **{k: v for k, v in vars(stats).items()}}


def query(args: argparse.Namespace) -> list:
    index = ImageIndex.load(args.index)
    model = load_model(args.model)
    hits = index.search(model, args.texts, k=args.k, rerank=args.rerank, backend=args.backend,
                        faiss_factory=args.faiss_factory, batch_size=args.batch_size)
    out = [{"text": t, "hits": [vars(h) for h in row]} for t, row in zip(args.texts, hits)]
    if args.json:
        print(json.dumps(out, indent=1))
        return out
    for entry in out:
        print(f"{entry['text']!r}:")
        for rank, h in enumerate(entry["hits"], 1):
            itm = f"  ITM {h['itm']:+.2f}" if h["itm"] is not None else ""
            print(f"  {rank}. {h['key']}  score {h['score']:.3f}  ITC {h['itc']:.3f}{itm}")
    return out


def main(argv=None):
    args = parse_args(argv)
    return build(args) if args.command == "build" else query(args)


if __name__ == "__main__":
    run_main(main)
