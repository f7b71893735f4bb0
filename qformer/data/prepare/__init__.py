"""Turn the standard downloads of BLIP-2's caption datasets into files the recipes read directly.

BLIP-2 pretrains on COCO + Visual Genome (+ CC / SBU / LAION, which come as webdataset shards
the recipes already read) and fine-tunes and evaluates on COCO's Karpathy split. Those downloads
come in several JSON layouts; this package writes each as a JSONL file of
``{"image", "caption", "image_id"}`` rows, one per caption, which
:func:`qformer.data.open_caption_source` opens with no options
(``--train-data data/coco_train.jsonl``). A folder of images with sidecar captions becomes an
imagefolder ``metadata.jsonl`` instead (``{"file_name", "text"}``, what ``datasets`` expects).

What happens here, and what deliberately does not:

* The layout is checked strictly: a wrong one is an error naming the file, the item and the
  field. A silently empty or half-read dataset is the expensive failure (found hours later).
* Captions are only stripped. BLIP-2's cleaning (lower case, punctuation, 50 words) is done by
  the collator, so that the file keeps the annotators' text and the cleaning lives in one place.
* Bad rows (empty captions, duplicate or surplus region phrases, annotations of unknown images,
  and with ``check_images`` missing image files) are dropped and counted, never fatal: a few of
  them in 600k captions should not stop anything, but they must be visible (see
  :class:`PrepareReport`, also written as ``<output>.report.json``).
* The output and its report are written with :mod:`qformer.io` (a temp file in the same
  directory, renamed into place, with the permissions the user's umask gives any new file), so
  an interrupted run never leaves a truncated file that a training run would take for the whole
  dataset.

Image paths: with ``image_root`` they are written absolute (``image_root`` / the annotation's
path). Readers resolve a relative path against the JSONL file's own directory, not the current
directory, so a cwd-relative path would point elsewhere; an absolute one works from anywhere.
Without ``image_root`` the annotation's relative paths are kept, and are resolved (and checked)
against the output's directory, exactly as the readers will.

Modules: :mod:`.report` (:class:`PrepareReport`, :class:`PrepareError`), :mod:`.collector`
(validation, counting and atomic output shared by every dataset), :mod:`.layout` (strict JSON
readers), :mod:`.coco`, :mod:`.vg`, :mod:`.folder`, :mod:`.vqav2` (VQAv2's questions + annotations ->
one row per question with its ten answers, for VQA fine-tuning and evaluation).
"""

from .coco import prepare_coco
from .folder import prepare_folder
from .report import IMAGE_EXTENSIONS, SKIP_REASONS, PrepareError, PrepareReport, report_path
from .vg import prepare_vg
from .vqav2 import prepare_vqav2

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "PrepareError",
    "PrepareReport",
    "prepare_coco",
    "prepare_folder",
    "prepare_vg",
    "prepare_vqav2",
    "report_path",
]
