"""BLIP-2 stage 1: train the Q-Former with ITC + ITM + ITG against a frozen vision tower.

    accelerate launch recipes/stage1.py                 # the built-in toy world (no downloads)
    accelerate launch recipes/stage1.py --adapter eva-vit-g_opt-2.7b --train-data DATA --eval-data DATA

Multi-process (DDP / FSDP / DeepSpeed) is whatever `accelerate config` says; on a CPU machine
`accelerate launch --multi_gpu --num_processes 2 recipes/stage1.py` runs two ranks on gloo.
Writes to --output-dir (default runs/ADAPTER/stage1): checkpoints/, model/ (the trained model),
metrics.jsonl, loss_curve.png, results.{json,md}, data_report.json and TensorBoard logs (tb/).
"""

from __future__ import annotations

from qformer import Blip2, Stage1Objective
from qformer.stage1 import stage1_loss_weights
from qformer.checkpoint import init_qformer_from_bert
from qformer.cli import build_parser, card_from_args
from qformer.data import Stage1Collator
from qformer.eval.report import format_grid, write_results
from qformer.eval.tasks import evaluate_eval_set_retrieval
from qformer.recipe import data_settings, feature_cache_for, fit, load_eval_set, open_training_data, start_run
from qformer.tokenizer import load_qformer_tokenizer


def main() -> None:
    # ---------------------------------------------------------------- config
    args = build_parser(1, __doc__).parse_args()
    card = card_from_args(args, stage=1)
    run = start_run(card, 1, output_dir=args.output_dir, progress=not args.no_progress)
    card = run.card  # toy:// resources resolved
    cfg = card.blip2_config(stage=1)  # stage 1 never touches the LLM
    eval_cfg = dict(card.eval.get("stage1", {}))
    run.print(f"stage 1 | adapter {card.name} | {run.world_size} process(es) on {run.accelerator.device} | "
              f"mixed precision {run.train.mixed_precision} | output {run.output_dir}")

    # ---------------------------------------------------------------- model
    tokenizer = load_qformer_tokenizer(card.tokenizer)
    model = Blip2(cfg, tokenizer=tokenizer)
    if card.qformer_init:  # BLIP-2 starts the Q-Former from bert-base-uncased
        run.print(init_qformer_from_bert(model, card.qformer_init))
    model.set_stage(1)
    model.qformer.set_gradient_checkpointing(run.train.gradient_checkpointing)
    run.print(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M; "
              f"frozen vision tower: {model.vision.describe()}")

    # ---------------------------------------------------------------- data
    # Without random augmentation the frozen tower's output is the same every epoch, so it
    # can be computed once and cached (keyed by image content and tower weights).
    split = card.data.get("stage1") or {}
    cache = feature_cache_for(run, model.vision, [split.get("train"), split.get("eval")]) \
        if data_settings(card)["cache_features"] else None
    loader = open_training_data(run, vision=cfg.vision, collate=Stage1Collator(tokenizer, max_length=cfg.max_txt_len),
                                feature_cache=cache)
    eval_set = load_eval_set(run, vision=cfg.vision, max_images=args.eval_size or eval_cfg.get("max_images", 1000),
                             feature_cache=cache)

    # ---------------------------------------------------------------- evaluation
    def evaluate(step: int) -> dict[str, float]:
        """Held-out retrieval, BLIP-2's protocol (ITC top-k, then ITM re-ranking of the k
        candidates), and beside it the ITC scores before re-ranking (same pass) to show what ITM adds."""
        if eval_set is None:
            return {}
        k = eval_cfg.get("k", 16)
        result = evaluate_eval_set_retrieval(model, eval_set, k=k, references="first", rank=run.rank,
                                             world_size=run.world_size, progress=run.progress)
        rows = {f"ITC top-{k} + ITM re-rank": {key: v for key, v in result.items() if isinstance(v, float)},
                "ITC only": result.itc_only or {}}
        metrics = {**rows[f"ITC top-{k} + ITM re-rank"], **{f"itc_{key}": v for key, v in rows["ITC only"].items()}}
        table = {name: {key.replace("_r", " R@").replace("R@_mean", "mean R").replace("r_mean", "mean R"): v
                        for key, v in row.items()} for name, row in rows.items()}
        run.print(f"\nstep {step}: retrieval among {len(eval_set)} held-out images (i2t: image->text)\n"
                  + format_grid(table, precision=1, row_title="scores"))
        return metrics

    # ---------------------------------------------------------------- train
    objective = Stage1Objective(model)
    t = run.train  # loss weights are a pure function of the step, so resume stays exact

    def step_fn(obj, batch, generator, step):
        weights = stage1_loss_weights(step, itc=t.itc_weight, itm=t.itm_weight, itg=t.itg_weight,
                                      ramp_steps=t.loss_ramp_steps)
        return obj(**batch, generator=generator, loss_weights=weights)

    state = fit(run, model=model, objective=objective, loader=loader,
                step_fn=step_fn,
                evaluate=evaluate if args.eval_size != 0 else None, resume=args.resume, stop_after=args.stop_after)

    # ---------------------------------------------------------------- save and report
    if state.step == run.train.max_steps:
        if run.is_main:
            # The frozen tower is written only if nothing else says where to load it from.
            model.save_pretrained(run.output_dir / "model", include_frozen=not cfg.vision.pretrained)
            write_results({"retrieval": run.last_eval()}, run.output_dir, name="results", title=f"{card.name}: stage 1",
                          extra={"adapter": card.name, "steps": state.step, "samples": state.samples_seen,
                                 "seconds": {k: round(v, 1) for k, v in run.timings.items()}})
            run.print(f"\nstage 1 done: {run.timing_summary()}; model saved to {run.output_dir / 'model'}")
    run.accelerator.end_training()


if __name__ == "__main__":
    main()
