"""Evaluate a trained BLIP-2 model: captioning, zero-shot VQA and image-text retrieval.

    python recipes/evaluate.py                     # runs/toy/stage2/model (else stage1) on the toy world's held-out split
    python recipes/evaluate.py --model runs/s2/model --data my_images/ --task caption,vqa
    accelerate launch --num_processes 2 recipes/evaluate.py ...    # ranks split the generation and ITM work

Tasks (default: every task the model supports; a stage-2 model has no retrieval heads unless
trained with --keep-stage1-heads, a stage-1 model has no LLM):
  caption    captions with the model's training prompt; COCO BLEU-1..4, METEOR, ROUGE-L, CIDEr and
             SPICE (METEOR and SPICE need Java, SPICE also Stanford CoreNLP on disk: otherwise they
             are skipped with a note); on the toy world also attribute accuracy (toy_*: are the
             scene's objects named with the right shape, colour and size).
  vqa        BLIP-2's zero-shot VQA ("Question: {} Answer:", FlanT5 "Question: {} Short answer:",
             beam 5, at most 10 new tokens, length penalty -1): VQAv2 accuracy and exact match.
  retrieval  ITC top-k then ITM re-ranking; recall@1/5/10 image->text and text->image.

Data (--data): "toy" (= toy://data/val, the toy world's held-out split, exported once into the
toy cache, with questions generated from each scene in toy://vqa/val), an imagefolder directory
(metadata.jsonl with file_name and text or a list of captions), a .jsonl/.csv of image +
caption, a hub dataset, ... (whatever the training recipes' --eval-data takes). VQA questions
come from --vqa-data (a .jsonl of image + question + answers) or from a vqa.jsonl inside the
--data folder.

Writes results.json, results.md, captions.jsonl and answers.jsonl to --output-dir (default:
next to the model, e.g. runs/toy/stage2/eval).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qformer import Blip2
from qformer.adapters import has_placeholder, resolve_value
from qformer.cli import run_main
from qformer.errors import ConfigError
from qformer.eval.captioning import DEFAULT_METRICS, METRIC_KEYS
from qformer.eval.report import print_table, write_results
from qformer.eval.retrieval import COMBINES
from qformer.eval.tasks import (
    evaluate_captioning,
    evaluate_eval_set_retrieval,
    evaluate_vqa,
    load_vqa_questions,
    first_record,
    open_eval_set,
    reference_column,
    write_jsonl,
)
from qformer.eval.vqa import VQADecodeSettings
from qformer.run import start_run

TASKS = ("caption", "vqa", "retrieval")
DEFAULT_MODELS = (Path("runs/toy/stage2/model"), Path("runs/toy/stage1/model"))
VQA = VQADecodeSettings()  # BLIP-2 / LAVIS zero-shot VQA decoding


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model", type=Path, default=None,
                   help="model directory (Blip2.from_pretrained) (default: runs/toy/stage2/model if it exists, "
                        "else runs/toy/stage1/model)")
    g.add_argument("--task", action="append", default=None, metavar="TASK",
                   help="caption, vqa or retrieval; repeat or comma-separate for several (default: every task the "
                        "model supports)")
    g.add_argument("--data", default="toy",
                   help='held-out images with captions: "toy" (the toy world\'s val split), an imagefolder dir, a '
                        ".jsonl/.csv file, a hub dataset, ... or a VQA .jsonl (default: toy)")
    g.add_argument("--vqa-data", default=None,
                   help="VQA questions: .jsonl with image + question + answers per line (default: vqa.jsonl in the "
                        "--data folder; generated for the toy world)")
    g.add_argument("--output-dir", type=Path, default=None,
                   help="where results.{json,md}, captions.jsonl and answers.jsonl go (default: MODEL/../eval)")
    g.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images only (default: all)")
    g.add_argument("--max-questions", type=int, default=None, help="answer the first N questions only (default: all)")
    g.add_argument("--caption-column", default=None,
                   help="the data's reference captions column (default: 'captions' / 'sentences' when the data has a "
                        "list of captions per image, as COCO files and toy exports do, else the first of text / "
                        "caption / ...; the training recipes' evaluation uses the same rule)")
    g.add_argument("--batch-size", type=int, default=32, help="images per generation / feature pass (default: 32)")
    g.add_argument("--llm-dtype", default=None, help="hold the frozen LLM in this dtype (default: as saved)")
    c = p.add_argument_group("captioning")
    c.add_argument("--num-beams", type=int, default=None,
                   help="beam width (default: the training run's card.json eval.stage2 setting, else LAVIS's 5)")
    c.add_argument("--max-new-tokens", type=int, default=None, help="most tokens per caption (default: the run's card, else LAVIS's 30)")
    c.add_argument("--min-new-tokens", type=int, default=None, help="fewest tokens per caption (default: the run's card, else LAVIS's 1)")
    c.add_argument("--caption-metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma list of COCO metric groups (default: {','.join(DEFAULT_METRICS)})")
    v = p.add_argument_group("VQA (defaults: BLIP-2 zero-shot)")
    v.add_argument("--vqa-prompt", default=None,
                   help='prompt template with {} for the question (default: "Question: {} Answer:", FlanT5 '
                        '"Question: {} Short answer:")')
    v.add_argument("--vqa-num-beams", type=int, default=VQA.num_beams, help=f"beam width (default: {VQA.num_beams})")
    v.add_argument("--vqa-max-new-tokens", type=int, default=VQA.max_new_tokens, help=f"most tokens per answer (default: {VQA.max_new_tokens})")
    v.add_argument("--vqa-length-penalty", type=float, default=VQA.length_penalty,
                   help=f"beam length penalty (default: {VQA.length_penalty}, which favours short answers)")
    v.add_argument("--vqa-protocol", choices=["official", "lavis"], default="official",
                   help="answer normalisation: the official VQAv2 script's or LAVIS's older copy (default: official)")
    r = p.add_argument_group("retrieval")
    r.add_argument("--k", type=int, default=128, help="ITC candidates re-ranked by ITM per query (default: 128, as BLIP-2)")
    r.add_argument("--combine", choices=COMBINES, default="itm+itc", help="final score (default: itm+itc, as LAVIS)")
    r.add_argument("--references", choices=["all", "first"], default="all",
                   help="texts to retrieve: every caption of every image (COCO) or the first only (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also QFORMER_DEBUG=1)")
    args = p.parse_args()
    asked = [t.strip() for item in (args.task or []) for t in item.split(",") if t.strip()]
    unknown = sorted(set(asked) - set(TASKS))
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    args.tasks = list(dict.fromkeys(asked)) or None
    args.caption_metrics = [m.strip().lower() for m in args.caption_metrics.split(",") if m.strip()]
    bad = sorted(set(args.caption_metrics) - set(METRIC_KEYS))
    if bad or not args.caption_metrics:
        p.error(f"--caption-metrics: unknown {bad or 'empty list'}; choose from {sorted(METRIC_KEYS)}")
    return args


# ---------------------------------------------------------------------------- model and tasks
def default_model() -> Path:
    for path in DEFAULT_MODELS:
        if (path / "config.json").is_file():
            return path
    raise ConfigError(f"no model to evaluate: {' and '.join(map(str, DEFAULT_MODELS))} do not exist "
                      "(train with recipes/stage1.py and recipes/stage2.py, or pass --model DIR)")


def unsupported(model: Blip2) -> dict[str, str]:
    """Task -> why this model cannot run it."""
    out = {}
    if model.config.llm is None:
        out["caption"] = out["vqa"] = "the model has no LLM (a stage-1 model)"
    if not model.config.stage1_heads or model.tokenizer is None:
        out["retrieval"] = ("the model has no ITC/ITM heads or Q-Former tokenizer (stage 2 drops them unless trained "
                            "with --keep-stage1-heads)")
    return out


def generate_options(args: argparse.Namespace, model_dir: Path) -> dict[str, int]:
    """Caption decoding: the command line, else the training run's eval settings (its card.json
    next to the model), else Blip2.generate's LAVIS defaults."""
    options: dict[str, int] = {}
    card = model_dir.parent / "card.json"
    if card.is_file():
        stage2 = (json.loads(card.read_text()).get("eval") or {}).get("stage2") or {}
        options = {k: stage2[k] for k in ("num_beams", "max_new_tokens", "min_new_tokens") if k in stage2}
    for key in ("num_beams", "max_new_tokens", "min_new_tokens"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


# ---------------------------------------------------------------------------- data
@dataclass
class EvalData:
    captions: Any | None  # what open_eval_set opens (caption + retrieval), None for a VQA file alone
    vqa: Path | None  # VQA questions
    label: str


def plugin_options(model_dir: Path) -> dict[str, dict[str, Any]]:
    """The ``plugins`` section of the training run's card (next to the model), so that e.g. the
    toy world's splits are the ones the model was trained and evaluated on."""
    card = model_dir.parent / "card.json"
    return (json.loads(card.read_text()).get("plugins") or {}) if card.is_file() else {}


def resolve_data(data: str, vqa_data: str | None, *, need_vqa: bool, options: dict, progress: bool) -> EvalData:
    """Where the images, captions and questions are. ``SCHEME://`` values are resolved by their
    plugin (``toy`` is short for ``toy://data/val``, whose questions are ``toy://vqa/val``)."""
    if data == "toy":
        data = "toy://data/val"
    if vqa_data is None and need_vqa and has_placeholder(data) and "://data/" in data:
        vqa_data = data.replace("://data/", "://vqa/", 1)  # a plugin's split and its questions
    label = data
    data = str(resolve_value(data, options, progress=progress))
    if vqa_data is not None and need_vqa:
        vqa_data = str(resolve_value(vqa_data, options, progress=progress))
    path = Path(data).expanduser()
    if path.suffix.lower() in (".jsonl", ".json") and path.is_file() and _is_vqa_file(path):
        return EvalData(None, Path(vqa_data) if vqa_data else path, label)
    if vqa_data is None and (path / "vqa.jsonl").is_file():
        vqa_data = str(path / "vqa.jsonl")
    return EvalData(data, Path(vqa_data) if vqa_data else None, f"{label} ({data})" if label != data else data)


def _is_vqa_file(path: Path) -> bool:
    return "question" in first_record(path)


# ---------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    model_dir = args.model or default_model()
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: no model there (a directory with config.json)")
    output_dir = args.output_dir or model_dir.parent / "eval"
    # The same run setup as the training recipes: accelerate's processes, CPU threads per rank,
    # the output folder checked before any work, main-process printing, per-phase timings.
    run = start_run(output_dir, progress=not args.no_progress)
    rank, world_size, say = run.rank, run.world_size, run.print

    # ---------------------------------------------------------------- model
    with run.phase("load"):
        model = Blip2.from_pretrained(model_dir, llm_dtype=args.llm_dtype).to(run.device).eval()
    cannot = unsupported(model)
    if args.tasks:
        bad = {t: cannot[t] for t in args.tasks if t in cannot}
        if bad:
            raise ConfigError("; ".join(f"--task {t}: {why}" for t, why in bad.items()))
    tasks = args.tasks or [t for t in TASKS if t not in cannot]
    if not tasks:
        raise ConfigError(f"{model_dir}: this model supports none of {list(TASKS)}")

    # ---------------------------------------------------------------- data
    with run.accelerator.main_process_first():  # a plugin's data (the toy world's) is exported once
        data = resolve_data(args.data, args.vqa_data, need_vqa="vqa" in tasks, options=plugin_options(model_dir),
                            progress=run.progress)
    for task, missing in (("vqa", data.vqa is None), ("caption", data.captions is None),
                          ("retrieval", data.captions is None)):
        if task in tasks and missing:
            why = ("no questions: pass --vqa-data FILE.jsonl (image, question, answers per line) or put a vqa.jsonl "
                   "in the --data folder") if task == "vqa" else f"{args.data} holds questions, not captions"
            if args.tasks:
                raise ConfigError(f"--task {task}: {why}")
            say(f"skipping {task}: {why}")
            tasks.remove(task)
    say(f"evaluate | model {model_dir} | tasks {', '.join(tasks)} | data {data.label} | {world_size} process(es) on "
        f"{run.device} | output {output_dir}")

    results: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    caption_eval = vqa_eval = None
    eval_set = None
    if "caption" in tasks or "retrieval" in tasks:
        column = args.caption_column or reference_column(data.captions)
        with run.phase("load"):
            eval_set = open_eval_set(data.captions, vision=model.config.vision, max_images=args.max_images,
                                     caption_column=column, progress=run.progress)
        refs = sum(len(r) for r in eval_set.references)
        say(f"{len(eval_set)} images, {refs} reference captions{f' (column {column!r})' if column else ''}"
            + "".join(f", {name} references" for name in eval_set.scorer_references))

    if "vqa" in tasks:  # read (and check) the questions before hours of captioning, not after
        questions = load_vqa_questions(data.vqa, max_questions=args.max_questions)
        say(f"{len(questions)} questions from {data.vqa}")

    # ---------------------------------------------------------------- tasks
    if "caption" in tasks:
        options = generate_options(args, model_dir)
        with run.phase("caption"):
            caption_eval = evaluate_captioning(model, eval_set, rank=rank, world_size=world_size,
                                               generate_options=options, metrics=args.caption_metrics,
                                               batch_size=args.batch_size, progress=run.progress)
        results["captioning"] = caption_eval.metrics
        settings["caption"] = {"generate": options, "metrics": args.caption_metrics, "prompt": model.config.llm.prompt}
    if "vqa" in tasks:
        decode = VQADecodeSettings(num_beams=args.vqa_num_beams, max_new_tokens=args.vqa_max_new_tokens,
                                   length_penalty=args.vqa_length_penalty)
        with run.phase("vqa"):
            vqa_eval = evaluate_vqa(model, questions, rank=rank, world_size=world_size, decode=decode,
                                    template=args.vqa_prompt, protocol=args.vqa_protocol, batch_size=args.batch_size,
                                    progress=run.progress)
        results["vqa"] = vqa_eval.metrics
        settings["vqa"] = {"data": str(data.vqa), **vqa_eval.metrics.info}
    if "retrieval" in tasks:
        with run.phase("retrieval"):
            results["retrieval"] = evaluate_eval_set_retrieval(
                model, eval_set, k=args.k, combine=args.combine, references=args.references, rank=rank,
                world_size=world_size, batch_size=args.batch_size, progress=run.progress)
        settings["retrieval"] = {"k": args.k, "combine": args.combine, "references": args.references}

    # ---------------------------------------------------------------- report
    if run.is_main:
        print()
        print_table(results)
        if caption_eval is not None:
            print("\nsample captions:\n" + caption_eval.sample_lines(5))
        if vqa_eval is not None:
            print("\nsample answers:\n" + vqa_eval.sample_lines(5))
        seconds = run.seconds()
        paths = write_results(results, output_dir, name="results", title=f"Evaluation of {model_dir}",
                              extra={"model": str(model_dir), "data": data.label, "tasks": tasks,
                                     "processes": world_size, "settings": settings, "seconds": seconds})
        if caption_eval is not None:
            write_jsonl(caption_eval.rows(), output_dir / "captions.jsonl")
        if vqa_eval is not None:
            write_jsonl(vqa_eval.rows(protocol=args.vqa_protocol), output_dir / "answers.jsonl")
        print(f"\nresults: {paths['json']} and {paths['markdown']}; per-sample predictions in {output_dir} "
              f"({seconds['total']:.0f} s)")
    run.accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_main(main)
