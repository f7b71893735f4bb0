"""BLIP-2 stage 1: train the Q-Former with ITC + ITM + ITG against a frozen vision tower.

    python recipes/stage1.py                            # the built-in toy world (no downloads), one process
    accelerate launch recipes/stage1.py --adapter eva-vit-g_opt-2.7b --train-data DATA --eval-data DATA
    accelerate launch recipes/stage1.py --adapter eva-vit-g_opt-2.7b_retrieval-ft --init-from STAGE1_MODEL ...

Multi-process runs take an accelerate config (configs/accelerate/: DDP and FSDP2 are tested, DeepSpeed
is not: README, "Training at real scale"); on a CPU machine
`accelerate launch --multi_gpu --num_processes 2 recipes/stage1.py` runs two ranks on gloo.
Writes to --output-dir (default runs/ADAPTER/stage1): card.json, checkpoints/, model/ (the
trained model), metrics.jsonl, loss_curve.png, results.json, results.md, data_report.json and
TensorBoard logs (tb/).
"""

from __future__ import annotations

from qformer import Blip2, Stage1Objective
from qformer.cli import parse_recipe_args, run_main
from qformer.data import Stage1Collator
from qformer.eval.report import format_grid
from qformer.eval.tasks import evaluate_eval_set_retrieval
from qformer.loop import fit
from qformer.persistence import init_from_stage1, init_qformer_from_bert
from qformer.recipe import feature_cache_for, finish_recipe, load_eval_set, open_training_data, start_recipe
from qformer.tokenizer import load_qformer_tokenizer


def main() -> None:
    # ---------------------------------------------------------------- config
    # Everything cheap is checked (card, --set keys, data files, output folder) before the
    # card's resources are prepared (the toy backbones are pretrained once, on first use).
    args = parse_recipe_args(1, __doc__)
    run, card = start_recipe(args, stage=1)
    cfg = card.blip2_config(stage=1)  # stage 1 never touches the LLM
    train, evaluation = card.train_config(1), card.eval.stage1
    run.print(f"stage 1 | adapter {card.name} | {run.world_size} process(es) on {run.device} | "
              f"mixed precision {train.mixed_precision} | output {run.output_dir}")

    # ---------------------------------------------------------------- model
    tokenizer = load_qformer_tokenizer(card.tokenizer)
    model = Blip2(cfg, tokenizer=tokenizer)
    if args.init_from is not None:  # fine-tuning (e.g. retrieval) starts from a pretrained stage-1 model
        run.print(init_from_stage1(model, args.init_from))
    elif card.qformer_init:  # BLIP-2 starts the Q-Former from bert-base-uncased
        run.print(init_qformer_from_bert(model, card.qformer_init))
    model.set_stage(1, vision_trainable_blocks=train.vision_trainable_blocks)  # fine-tuning: the tower too
    model.qformer.set_gradient_checkpointing(train.gradient_checkpointing)
    if model.vision.trains:
        model.vision.set_gradient_checkpointing(train.gradient_checkpointing)
    run.print(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M; "
              f"{'trainable' if model.vision.trains else 'frozen'} vision tower: {model.vision.describe()}")

    # ---------------------------------------------------------------- data
    # Without random augmentation the frozen tower's output is the same every epoch, so it
    # can be computed once and cached (keyed by image content and tower weights).
    split = card.data.stage1
    cache = feature_cache_for(run, model.vision, [split.train, split.eval], source_options=card.data.source_options()) \
        if card.data.cache_features else None
    loader = open_training_data(run, card, 1, vision=cfg.vision, feature_cache=cache,
                                collate=Stage1Collator(tokenizer, max_length=cfg.max_txt_len))
    eval_set = load_eval_set(card, 1, vision=cfg.vision, max_images=evaluation.max_images, feature_cache=cache)

    # ---------------------------------------------------------------- evaluation
    def evaluate(step: int) -> dict[str, float]:
        """Held-out retrieval, BLIP-2's protocol (ITC top-k, then ITM re-ranking of the k
        candidates), and beside it the ITC scores before re-ranking (same pass) to show what ITM adds."""
        k = evaluation.k
        result = evaluate_eval_set_retrieval(model, eval_set, k=k, references="first", rank=run.rank,
                                             world_size=run.world_size, progress=run.progress)
        rows = {f"ITC top-{k} + ITM re-rank": {key: v for key, v in result.items() if isinstance(v, float)},
                "ITC only": result.itc_only or {}}
        table = {name: {key.replace("_r", " R@").replace("R@_mean", "mean R").replace("r_mean", "mean R"): v
                        for key, v in row.items()} for name, row in rows.items()}
        run.print(f"\nstep {step}: retrieval among {len(eval_set)} held-out images (i2t: image->text)\n"
                  + format_grid(table, precision=1, row_title="scores"))
        return {**rows[f"ITC top-{k} + ITM re-rank"], **{f"itc_{key}": v for key, v in rows["ITC only"].items()}}

    # ---------------------------------------------------------------- train
    # The objective runs every Q-Former pass of a step in one forward (what DDP needs); its
    # loss weights are a pure function of the step, so a resumed run stays exact.
    objective = Stage1Objective(model, card.stage1_objective)
    ramp = card.stage1_objective.loss_ramp_steps
    state = fit(run, train, model=model, objective=objective, loader=loader,
                evaluate=evaluate if eval_set is not None else None, resume=args.resume, stop_after=args.stop_after,
                title=f"{card.name}: stage 1", plot_spans=[(0, ramp, "ITM + ITG ramping in")] if ramp else [])

    # ---------------------------------------------------------------- save and report
    finish_recipe(run, card, 1, state, model, task="retrieval", include_frozen=not cfg.vision.pretrained)


if __name__ == "__main__":
    run_main(main)
