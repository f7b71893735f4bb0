"""BLIP-2 stage 2: the stage-1 Q-Former's query outputs, projected, as soft prompts of a frozen LLM.

    python recipes/stage2.py                            # the built-in toy world, from runs/toy/stage1/model
    accelerate launch recipes/stage2.py --adapter eva-vit-g_opt-2.7b --init-from runs/s1/model --train-data DATA

Starts from a stage-1 model (--init-from, default runs/ADAPTER/stage1/model) and trains the
Q-Former's query path and the language projection (and LoRA adapters if the card asks) with
next-token loss of the frozen LLM (OPT: caption + "\\n"; FlanT5: BLIP-2's prefix-LM split).
Writes card.json, checkpoints/, model/, metrics.jsonl, loss_curve.png, results.json,
results.md, samples.txt, data_report.json and TensorBoard logs (tb/) to --output-dir
(default runs/ADAPTER/stage2).
"""

from __future__ import annotations

from qformer import Blip2, Stage2Objective, Stage2TextCollator
from qformer.cli import parse_recipe_args, run_main
from qformer.data import Stage2Collator
from qformer.eval.report import format_table
from qformer.eval.tasks import evaluate_captioning
from qformer.llm import is_encoder_decoder
from qformer.loop import fit
from qformer.persistence import init_from_stage1
from qformer.recipe import (default_init_from, feature_cache_for, finish_recipe, load_eval_set, open_training_data,
                            start_recipe)
from qformer.tokenizer import load_qformer_tokenizer


def main() -> None:
    # ---------------------------------------------------------------- config
    args = parse_recipe_args(2, __doc__)
    run, card = start_recipe(args, stage=2)
    cfg = card.blip2_config(stage=2)
    if not args.keep_stage1_heads:  # LAVIS drops the Q-Former's text side in stage 2
        cfg.qformer.text_input, cfg.stage1_heads = False, False
    train, evaluation = card.train_config(2), card.eval.stage2
    init_from = args.init_from or default_init_from(card)
    run.print(f"stage 2 | adapter {card.name} | LLM {cfg.llm.path} ({cfg.llm.dtype}"
              f"{', ' + cfg.llm.quantization if cfg.llm.quantization else ''}) | from {init_from} | output {run.output_dir}")

    # ---------------------------------------------------------------- model
    tokenizer = load_qformer_tokenizer(card.tokenizer) if cfg.stage1_heads else None
    model = Blip2(cfg, tokenizer=tokenizer)
    run.print(init_from_stage1(model, init_from))  # what came from where, and what starts fresh
    model.set_stage(2, vision_trainable_blocks=train.vision_trainable_blocks)  # fine-tuning: the tower too
    model.qformer.set_gradient_checkpointing(train.gradient_checkpointing)
    if model.vision.trains:
        model.vision.set_gradient_checkpointing(train.gradient_checkpointing)
    run.print(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M; "
              f"{'trainable' if model.vision.trains else 'frozen'} vision tower: {model.vision.describe()}")

    # ---------------------------------------------------------------- data
    split = card.data.stage2
    cache = feature_cache_for(run, model.vision, [split.train, split.eval], source_options=card.data.source_options()) \
        if card.data.cache_features else None
    # Captions are tokenised for the LLM in the collator (BLIP-2's label rules, the prefix-LM split).
    text = Stage2TextCollator(model.llm_tokenizer, cfg.llm, encoder_decoder=is_encoder_decoder(model.llm))
    loader = open_training_data(run, card, 2, vision=cfg.vision, feature_cache=cache,
                                collate=Stage2Collator(text, seed=train.seed))
    eval_set = load_eval_set(card, 2, vision=cfg.vision, max_images=evaluation.max_images, feature_cache=cache)

    # ---------------------------------------------------------------- evaluation
    def evaluate(step: int) -> dict[str, float]:
        """Held-out captioning: COCO metrics (and what the data's plugin scores, e.g. the toy world's attributes)."""
        result = evaluate_captioning(model, eval_set, rank=run.rank, world_size=run.world_size,
                                     generate_options=evaluation.generate_options(), progress=run.progress)
        run.print(f"\nstep {step}: captioning {len(eval_set)} held-out images\n"
                  + format_table({"captioning": result.metrics}))
        if run.is_main:
            run.print("sample captions:\n" + result.sample_lines(8))
            result.write_samples(run.output_dir / "samples.txt")
        return dict(result.metrics)

    # ---------------------------------------------------------------- train
    objective = Stage2Objective(model)
    state = fit(run, train, model=model, objective=objective, loader=loader,
                evaluate=evaluate if eval_set is not None else None, resume=args.resume, stop_after=args.stop_after,
                title=f"{card.name}: stage 2")

    # ---------------------------------------------------------------- save and report
    finish_recipe(run, card, 2, state, model, task="captioning",
                  include_frozen=not (cfg.vision.pretrained and cfg.llm.path))


if __name__ == "__main__":
    run_main(main)
