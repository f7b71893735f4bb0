"""Turn the standard downloads of BLIP-2's caption datasets into files the recipes read directly.

    # COCO, Karpathy split (BLIP / LAVIS annotation files; images under /data/coco/{train,val}2014)
    python recipes/prepare_data.py coco --karpathy coco_karpathy_train.json --image-root /data/coco --output data/coco_train.jsonl
    python recipes/prepare_data.py coco --karpathy coco_karpathy_val.json --image-root /data/coco --output data/coco_val.jsonl
    # COCO's own 2017 captions (paths are bare file names: the root is the image folder itself)
    python recipes/prepare_data.py coco --annotations annotations/captions_train2017.json --image-root /data/coco/train2017 --output data/coco2017_train.jsonl
    # Visual Genome as BLIP-2 uses it (LAVIS vg_caption.json), or from the raw region descriptions
    python recipes/prepare_data.py vg --captions vg_caption.json --image-root /data/vg --output data/vg.jsonl
    python recipes/prepare_data.py vg --regions region_descriptions.json --image-data image_data.json --max-per-image 10 --image-root /data/vg --output data/vg_regions.jsonl
    # VQAv2 (official questions + annotations; images COCO_train2014_<id>.jpg under /data/coco/train2014)
    python recipes/prepare_data.py vqav2 --questions v2_OpenEnded_mscoco_train2014_questions.json --annotations v2_mscoco_train2014_annotations.json --image-root /data/coco/train2014 --output data/vqav2_train.jsonl
    # a folder of images with sidecar captions (cat.jpg + cat.txt) or a CSV -> folder/metadata.jsonl
    python recipes/prepare_data.py folder my_images/

    accelerate launch recipes/stage1.py --adapter ... --train-data data/coco_train.jsonl data/vg.jsonl --eval-data data/coco_val.jsonl

Rows are {"image", "caption", "image_id"}, one per caption (folders: an imagefolder metadata.jsonl
of {"file_name", "text"}; VQAv2: {"image", "question", "answers", "question_id", "image_id",
"question_type", "answer_type"}, one per question). Captions are only stripped: BLIP-2's cleaning happens in the collator.
Empty captions, duplicate region phrases, annotations of unknown images and (--check-images)
missing image files are dropped and counted. A summary is printed and written next to the output
as <output>.report.json. The output is written to a temp file and renamed (with the permissions your
umask gives any new file), so an interrupted run never leaves a partial file behind.

Exit status: 0 on success, 1 when no row was written, 2 when an input is missing or malformed.
"""

from __future__ import annotations

import argparse
import sys

from qformer.data.prepare import PrepareReport, prepare_coco, prepare_folder, prepare_vg, prepare_vqav2, report_path
from qformer.errors import QFormerError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    sub = p.add_subparsers(dest="dataset", required=True, metavar="{coco,vg,vqav2,folder}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--limit", type=int, default=None, metavar="N",
                        help="write at most N rows (folder / --group: N images), for a quick trial file")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("--output", required=True, metavar="JSONL", help="the .jsonl to write (the report goes to JSONL.report.json)")
    images.add_argument("--image-root", default=None, metavar="DIR",
                        help="the folder the annotation's image paths are relative to; paths are written absolute "
                             "(without it they stay relative and are resolved against the output's folder)")
    images.add_argument("--check-images", action="store_true",
                        help="drop captions whose image file does not exist, counting them and naming the first few")

    coco = sub.add_parser("coco", parents=[images, common], formatter_class=formatter,
                          help="COCO captions: Karpathy split JSON and/or COCO's captions_*.json",
                          description="COCO captions -> {image, caption, image_id} rows, one per caption.\n\n"
                                      "Karpathy files name images 'val2014/COCO_val2014_...jpg': --image-root is the\n"
                                      "COCO folder holding train2014/ and val2014/. COCO's captions_*2017.json name\n"
                                      "bare file names: --image-root is the train2017/ (or val2017/) folder itself.")
    src = coco.add_argument_group("input (at least one)")
    src.add_argument("--karpathy", nargs="+", default=[], metavar="JSON",
                     help="coco_karpathy_{train,val,test}.json (several are concatenated, e.g. train + val)")
    src.add_argument("--annotations", nargs="+", default=[], metavar="JSON",
                     help="COCO's annotations/captions_{train,val}2017.json ({images, annotations})")
    coco.add_argument("--group", action="store_true",
                      help="one row per image with the list of its captions (an eval file; the readers expand it)")

    vg = sub.add_parser("vg", parents=[images, common], formatter_class=formatter,
                        help="Visual Genome: LAVIS vg_caption.json or raw region_descriptions.json",
                        description="Visual Genome -> {image, caption, image_id} rows, one per caption,\n"
                                    "deduplicated per image (case and spacing ignored), empty phrases dropped.\n\n"
                                    "--image-root is the folder holding VG_100K/ and VG_100K_2/.")
    vsrc = vg.add_mutually_exclusive_group(required=True)
    vsrc.add_argument("--captions", nargs="+", metavar="JSON",
                      help="LAVIS's vg_caption.json: [{image: 'VG_100K/1.jpg', caption}] (what BLIP-2 trained on)")
    vsrc.add_argument("--regions", metavar="JSON",
                      help="the raw region_descriptions.json: one caption per region phrase")
    vg.add_argument("--image-data", metavar="JSON", default=None,
                    help="the raw image_data.json (image id -> url -> VG_100K[_2]/ID.jpg), for --regions; "
                         "default: next to the regions file")
    vg.add_argument("--max-per-image", type=int, default=None, metavar="N",
                    help="at most N captions per image (with --regions: those of the N largest regions)")

    vqa = sub.add_parser("vqav2", parents=[images, common], formatter_class=formatter,
                         help="VQAv2: the official questions + annotations JSON -> one row per question",
                         description="VQAv2 -> {image, question, answers (ten), question_id, image_id, question_type,\n"
                                     "answer_type} rows, joined on question_id; for recipes/instruct.py (VQA\n"
                                     "fine-tuning: --train-data / --eval-data) and recipes/evaluate.py --task vqa.\n\n"
                                     "--image-root is the split's image folder itself (/data/coco/train2014): images\n"
                                     "are COCO_<data_subtype>_<image_id, 12 digits>.jpg there.")
    vqa.add_argument("--questions", required=True, metavar="JSON", help="v2_OpenEnded_mscoco_<split>_questions.json")
    vqa.add_argument("--annotations", required=True, metavar="JSON", help="v2_mscoco_<split>_annotations.json")
    vqa.add_argument("--data-subtype", default=None, metavar="SPLIT",
                     help="the image file names' split, e.g. train2014 (default: the files' data_subtype)")

    folder = sub.add_parser("folder", parents=[common], formatter_class=formatter,
                            help="a folder of images with sidecar .txt captions or a CSV -> metadata.jsonl",
                            description="A folder of images -> an imagefolder metadata.jsonl ({file_name, text}),\n"
                                        "so that --train-data DIR reads it.\n\n"
                                        "Captions come from sidecar files (cat.jpg + cat.txt: the whole file is one\n"
                                        "caption) or from --csv (paths relative to DIR; several rows for one image give\n"
                                        "it several captions, and 'text' becomes a list). Images without a caption and\n"
                                        "CSV rows without an image file are counted and left out.")
    folder.add_argument("folder", metavar="DIR", help="the image folder")
    folder.add_argument("--csv", default=None, metavar="CSV", help="captions from this CSV/TSV instead of sidecar .txt files")
    folder.add_argument("--image-column", default=None, help="the CSV's image column (default: file_name, image, path ...)")
    folder.add_argument("--caption-column", default=None, help="the CSV's caption column (default: text, caption ...)")
    folder.add_argument("--output", default=None, metavar="JSONL",
                        help="default DIR/metadata.jsonl (elsewhere, image paths outside its folder are written absolute "
                             "and the file is read as --train-data JSONL)")

    args = p.parse_args(argv)
    if args.dataset == "coco" and not (args.karpathy or args.annotations):
        coco.error("pass --karpathy and/or --annotations")
    return args


def prepare(args: argparse.Namespace) -> PrepareReport:
    progress = not args.no_progress
    if args.dataset == "coco":
        return prepare_coco(karpathy=args.karpathy, annotations=args.annotations, output=args.output,
                            image_root=args.image_root, check_images=args.check_images, limit=args.limit,
                            group=args.group, progress=progress)
    if args.dataset == "vqav2":
        return prepare_vqav2(questions=args.questions, annotations=args.annotations, output=args.output,
                             image_root=args.image_root, data_subtype=args.data_subtype, check_images=args.check_images,
                             limit=args.limit, progress=progress)
    if args.dataset == "vg":
        return prepare_vg(captions=args.captions, regions=args.regions, image_data=args.image_data, output=args.output,
                          image_root=args.image_root, max_per_image=args.max_per_image, check_images=args.check_images,
                          limit=args.limit, progress=progress)
    return prepare_folder(folder=args.folder, output=args.output, csv_file=args.csv, image_column=args.image_column,
                          caption_column=args.caption_column, limit=args.limit, progress=progress)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = prepare(args)
    except QFormerError as exc:  # a missing or malformed input (PrepareError), named in one line
        print(f"prepare_data.py {args.dataset}: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"report: {report_path(report.output)}")
    if report.rows == 0:
        print("error: no row was written (see the skipped counts above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
