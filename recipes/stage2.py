"""BLIP-2 stage 2: the stage-1 Q-Former's query outputs, projected, as soft prompts of a frozen LLM.

    accelerate launch recipes/stage2.py                 # the built-in toy world, from runs/toy/stage1/model
    accelerate launch recipes/stage2.py --adapter eva-vit-g_opt-2.7b --init-from runs/s1/model --train-data DATA

Starts from a stage-1 model (--init-from, default runs/ADAPTER/stage1/model) and trains the
Q-Former's query path and the language projection (and LoRA adapters if the card asks) with
next-token loss of the frozen LLM (OPT: caption + "\\n"; FlanT5: BLIP-2's prefix-LM split).
Writes checkpoints/, model/, metrics.jsonl, loss_curve.png, results.{json,md},
samples.txt and data_report.json to --output-dir (default runs/ADAPTER/stage2).
"""

from __future__ import annotations

from pathlib import Path

from qformer import Blip2
from qformer.checkpoint import init_from_stage1
from qformer.cli import build_parser, card_from_args
from qformer.data import Stage2Collator
from qformer.eval.report import format_table, write_results
from qformer.eval.tasks import evaluate_captioning
from qformer.llm import is_encoder_decoder
from qformer.recipe import data_settings, feature_cache_for, fit, load_eval_set, open_training_data, start_run
from qformer.stage2 import Stage2Objective, Stage2TextCollator
from qformer.tokenizer import load_qformer_tokenizer


def main() -> None:
    # ---------------------------------------------------------------- config
    args = build_parser(2, __doc__).parse_args()
    card = card_from_args(args, stage=2)
    run = start_run(card, 2, output_dir=args.output_dir, progress=not args.no_progress)
    card = run.card  # toy:// resources resolved
    cfg = card.blip2_config(stage=2)
    if not args.keep_stage1_heads:  # LAVIS drops the Q-Former's text side in stage 2
        cfg.qformer.text_input, cfg.stage1_heads = False, False
    eval_cfg = dict(card.eval.get("stage2", {}))
    init_from = args.init_from or Path("runs") / card.name / "stage1" / "model"
    run.print(f"stage 2 | adapter {card.name} | LLM {cfg.llm.path} ({cfg.llm.dtype}"
              f"{', ' + cfg.llm.quantization if cfg.llm.quantization else ''}) | from {init_from} | output {run.output_dir}")

    # ---------------------------------------------------------------- model
    tokenizer = load_qformer_tokenizer(card.tokenizer) if cfg.stage1_heads else None
    model = Blip2(cfg, tokenizer=tokenizer)
    run.print(init_from_stage1(model, init_from))
    model.set_stage(2)
    model.qformer.set_gradient_checkpointing(run.train.gradient_checkpointing)
    run.print(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M")

    # ---------------------------------------------------------------- data
    split = card.data.get("stage2") or {}
    cache = feature_cache_for(run, model.vision, [split.get("train"), split.get("eval")]) \
        if data_settings(card)["cache_features"] else None
    text = Stage2TextCollator(model.llm_tokenizer, cfg.llm, encoder_decoder=is_encoder_decoder(model.llm))
    loader = open_training_data(run, vision=cfg.vision, collate=Stage2Collator(text, seed=run.train.seed),
                                feature_cache=cache)
    eval_set = load_eval_set(run, vision=cfg.vision, max_images=args.eval_size or eval_cfg.get("max_images", 500),
                             feature_cache=cache)
    generate_options = {k: eval_cfg[k] for k in ("num_beams", "max_new_tokens", "min_new_tokens") if k in eval_cfg}

    # ---------------------------------------------------------------- evaluation
    def evaluate(step: int) -> dict[str, float]:
        """Held-out captioning: COCO metrics, and attribute accuracy on the toy world."""
        if eval_set is None:
            return {}
        result = evaluate_captioning(model, eval_set, rank=run.rank, world_size=run.world_size,
                                     generate_options=generate_options, progress=run.progress)
        metrics = dict(result.metrics)
        run.print(f"\nstep {step}: captioning {len(eval_set)} held-out images\n" + format_table({"captioning": metrics}))
        if run.is_main:
            run.print("sample captions:\n" + result.sample_lines(8))
            result.write_samples(run.output_dir / "samples.txt")
        return metrics

    # ---------------------------------------------------------------- train
    objective = Stage2Objective(model)
    state = fit(run, model=model, objective=objective, loader=loader,
                step_fn=lambda obj, batch, generator, step: obj(**batch),
                evaluate=evaluate if args.eval_size != 0 else None, resume=args.resume, stop_after=args.stop_after)

    # ---------------------------------------------------------------- save and report
    if state.step == run.train.max_steps and run.is_main:
        model.save_pretrained(run.output_dir / "model", include_frozen=not (cfg.vision.pretrained and cfg.llm.path))
        write_results({"captioning": run.last_eval()}, run.output_dir, name="results", title=f"{card.name}: stage 2",
                      extra={"adapter": card.name, "steps": state.step, "samples": state.samples_seen,
                                 "seconds": {k: round(v, 1) for k, v in run.timings.items()}})
        run.print(f"\nstage 2 done: {run.timing_summary()}; model saved to {run.output_dir / 'model'}")
    run.accelerator.end_training()


if __name__ == "__main__":
    main()
