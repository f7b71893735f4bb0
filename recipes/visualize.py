"""Where the Q-Former looks: PNG overlays of each query's cross-attention and of Grad-CAM.

    python recipes/visualize.py --images a.jpg b.jpg                       # runs/toy/stage1/model
    python recipes/visualize.py --model M --images a.jpg --texts "a dog on a sofa" "a cat" --words

For each image, queries_NAME.png: the image and each query's cross-attention map (averaged
over heads) at one cross-attention layer (--layer, default the last). With --texts, for every
image and every text, gradcam_NAME_K_TEXT.png: Grad-CAM of the ITM match score (the gradient of
the match logit with respect to the cross-attention probabilities, clamped at zero, times the
attention, averaged over heads and queries, as ALBEF / BLIP) at --gradcam-layer (default the
middle cross-attention layer), titled with the ITM match probability; --words adds a map per
word (the evidence lost when the word is masked) with the drop of the match logit. Grad-CAM needs
the ITM head: a stage-1 model (or stage 2 trained with --keep-stage1-heads).

Writes the PNGs and pictures.json (files, ITM scores, each map's peak cell) to --output-dir
(default: next to the model, e.g. runs/toy/stage1/pictures).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qformer import Blip2
from qformer.cli import run_main
from qformer.errors import ConfigError
from qformer.figures import write_pictures

DEFAULT_MODEL = Path("runs/toy/stage1/model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help=f"model directory (Blip2.from_pretrained) (default: {DEFAULT_MODEL})")
    p.add_argument("--images", nargs="+", type=Path, required=True, help="image files")
    p.add_argument("--texts", nargs="+", default=[], help="captions: a Grad-CAM overlay for every (image, text)")
    p.add_argument("--layer", type=int, default=None,
                   help="Q-Former layer of the query maps (a cross-attention layer; default: the last)")
    p.add_argument("--gradcam-layer", type=int, default=None,
                   help="Q-Former layer of Grad-CAM (a cross-attention layer; default: the middle one, "
                        "layer 6 for BLIP-2)")
    p.add_argument("--words", action="store_true", help="also a Grad-CAM map per word (by masking each word)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where the PNGs and pictures.json go (default: MODEL/../pictures)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also QFORMER_DEBUG=1)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise ConfigError(f"--model {args.model}: no model there (a directory with config.json)")
    for path in args.images:
        if not path.is_file():
            raise FileNotFoundError(2, "image file not found", str(path))
    out = args.output_dir or args.model.parent / "pictures"
    model = Blip2.from_pretrained(args.model).eval()
    summary = write_pictures(model, args.images, out, texts=args.texts, names=[p.name for p in args.images],
                             layer=args.layer, gradcam_layer=args.gradcam_layer, words=args.words)
    for entry in summary["images"]:
        print(f"{entry['image']}: {entry['queries']}")
        for cam in entry["gradcam"]:
            print(f"  ITM {cam['itm_score']:.3f}  {cam['text']!r}: {cam['file']}")
    print(f"pictures.json and the PNGs are in {out}")
    return summary


if __name__ == "__main__":
    run_main(main)
