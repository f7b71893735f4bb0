"""Instruction tuning (InstructBLIP): the Q-Former reads the instruction beside the queries, the
frozen LLM answers after the soft prompts and the instruction; trained on a mixture of tasks.

    python recipes/instruct.py                          # the toy world, from runs/toy/stage2/model (make demo first)
    accelerate launch recipes/instruct.py --adapter eva-vit-g_opt-2.7b --init-from runs/s2/model \\
        --train-data vqa.jsonl llava_instruct.json coco_captions.jsonl --eval-data vqa_val.jsonl

Starts from a BLIP-2 stage-2 model (--init-from, default runs/ADAPTER/stage2/model) as
InstructBLIP starts from BLIP-2; the Q-Former's text parts, which LAVIS-style stage-2 models
drop, come from the stage-1 model (--stage1-from, default runs/ADAPTER/stage1/model). Data:
instruction rows {image|video, instruction|question, answer|answers}, LLaVA conversations, VQA
files (InstructBLIP's VQA templates) and caption datasets (its captioning templates), mixed in
proportion to the square root of their sizes. BLIP-2's VQA fine-tuning is this recipe with one
template, weighted answers and the tower unfrozen (adapters/eva-vit-g_opt-2.7b_vqa-ft.yaml:
--vqa-template, --vqa-answers weighted, --vision-trainable-blocks). Prints held-out VQA accuracy
per question type (and VQAv2 accuracy when every question has several answers):
the instruction-tuned model, the BLIP-2 model it started from (zero-shot) and an image-blind
baseline. Writes card.json, checkpoints/, model/, metrics.jsonl, loss_curve.png, results.json,
results.md, answers.jsonl, data_report.json and TensorBoard logs (tb/) to --output-dir (default
runs/ADAPTER/instruct).
"""

from __future__ import annotations

import dataclasses
import json

from qformer import Blip2, Stage2Objective, Stage2TextCollator
from qformer.cli import parse_recipe_args, run_main
from qformer.data import CaptionLoader, Stage2Collator, open_instruction_dataset, open_instruction_mixture
from qformer.eval.instruct import INSTRUCT_VQA_TEMPLATE, comparison_table, image_blind_baseline
from qformer.eval.tasks import evaluate_vqa, load_vqa_questions
from qformer.eval.vqa import VQADecodeSettings
from qformer.io import atomic_write_text
from qformer.llm import add_lora, is_encoder_decoder
from qformer.loop import fit
from qformer.persistence import instruction_aware_from
from qformer.recipe import default_init_from, feature_cache_for, finish_recipe, start_recipe


def main() -> None:
    # ---------------------------------------------------------------- config
    args = parse_recipe_args("instruct", __doc__)
    run, card = start_recipe(args, stage="instruct")
    train, evaluation, data = card.train_config("instruct"), card.eval.instruct, card.data.instruct
    init_from = args.init_from or default_init_from(card, "instruct")
    stage1_from = args.stage1_from or default_init_from(card, 2)
    run.print(f"instruction tuning | adapter {card.name} | from {init_from} | output {run.output_dir}")

    # ---------------------------------------------------------------- model
    # InstructBLIP starts from BLIP-2: same tower, LLM, queries, Q-Former and projection; the
    # Q-Former now also reads the instruction, with the text parts stage 1 trained.
    wanted = card.blip2_config(stage=2)  # the card's LLM settings: dtype, 8-/4-bit, LoRA (as stage 2)
    llm = wanted.llm
    blip2 = Blip2.from_pretrained(init_from, llm_dtype=llm.dtype, llm_quantization=llm.quantization)
    # VQA fine-tuning (BLIP-2) trains the tower too, at the card's resolution and in float32.
    tower = None
    if train.vision_trainable_blocks:
        tower = dataclasses.replace(blip2.config.vision, image_size=wanted.vision.image_size, dtype=wanted.vision.dtype)
    model, report = instruction_aware_from(Blip2, blip2, stage1=stage1_from if stage1_from.is_dir() else None,
                                           vision=tower)
    run.print(report)
    if llm.lora is not None and model.config.llm.lora is None:  # fresh LoRA adapters train with the Q-Former
        model.llm = add_lora(model.llm, llm.lora, quantized=llm.quantization is not None)
        model.config.llm.lora = dict(llm.lora)
    # The query path, the instruction's text parts and the projection train (and the tower's last
    # vision_trainable_blocks blocks, for BLIP-2's VQA fine-tuning); the LLM stays frozen.
    model.set_stage(2, vision_trainable_blocks=train.vision_trainable_blocks)
    model.qformer.set_gradient_checkpointing(train.gradient_checkpointing)
    if model.vision.trains:
        model.vision.set_gradient_checkpointing(train.gradient_checkpointing)
    run.print(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M; "
              f"{'trainable' if model.vision.trains else 'frozen'} vision tower: {model.vision.describe()}")

    # ---------------------------------------------------------------- data
    mixture = open_instruction_mixture(data.train, seed=train.seed, **card.data.instruction_options(),
                                       **card.data.source_options())
    run.print(f"instruction data: {mixture.name}, {len(mixture)} draws per epoch; VQA rows asked "
              f"{repr(card.data.vqa_template) if card.data.vqa_template else 'with InstructBLIP templates'}, trained "
              f"{'on every answer, weighted' if card.data.vqa_answers == 'weighted' else 'on the most frequent answer'}")
    # With the cache, the frozen tower runs once per distinct image (never on augmented pixels);
    # video clips are sampled frames, not cached images, so data with videos runs the tower live.
    use_cache = card.data.cache_features and not mixture.has_video
    if card.data.cache_features and not use_cache:
        run.print("the data holds video clips: no feature cache (the tower runs on every clip's frames)")
    cache = feature_cache_for(run, model.vision, [mixture]) if use_cache else None
    dataset = open_instruction_dataset(mixture, vision=model.config.vision, train=card.data.augment and cache is None,
                                       feature_cache=cache, num_frames=model.config.num_frames, seed=train.seed)
    # Answers are tokenised for the LLM, instructions for the LLM and the Q-Former, in the collator.
    text = Stage2TextCollator(model.llm_tokenizer, model.config.llm, encoder_decoder=is_encoder_decoder(model.llm),
                              qformer_tokenizer=model.tokenizer, qformer_max_length=model.config.instruction_tokens)
    loader = CaptionLoader(dataset, Stage2Collator(text, seed=train.seed), batch_size=train.batch_size,
                           num_workers=train.num_workers, seed=train.seed, rank=run.rank, world_size=run.world_size,
                           drop_last=True, persistent_workers=train.num_workers > 0)
    questions = None
    if data.eval is not None and evaluation.max_images:
        questions = load_vqa_questions(data.eval, max_questions=evaluation.max_images)
    decode = VQADecodeSettings(**evaluation.generate_options())

    # ---------------------------------------------------------------- evaluation
    def answer_all(m: Blip2, template: str):
        return evaluate_vqa(m, questions, rank=run.rank, world_size=run.world_size, decode=decode,
                            template=template, progress=run.progress)

    before = None
    if questions is not None and not args.resume:  # the BLIP-2 model it starts from, zero-shot, BLIP-2's prompt
        with run.phase("eval"):
            before = answer_all(blip2.eval(), None)
        vqa = before.metrics.get("vqa_accuracy")
        run.print(f"BLIP-2 zero-shot on {len(questions)} held-out questions: exact match "
                  f"{before.metrics['exact_match']:.1f}%" + (f", VQAv2 accuracy {vqa:.1f}%" if vqa is not None else ""))
    del blip2  # its LLM lives on in the instruction-aware model

    asked = card.data.vqa_template or INSTRUCT_VQA_TEMPLATE  # a fine-tuned model is asked as it was trained

    def evaluate(step: int) -> dict[str, float]:
        result = answer_all(model, asked)
        vqa = result.metrics.get("vqa_accuracy")
        run.print(f"\nstep {step}: held-out VQA exact match {result.metrics['exact_match']:.1f}%"
                  + (f", VQAv2 accuracy {vqa:.1f}%" if vqa is not None else "") + "\n" + result.sample_lines(6))
        if run.is_main:
            write_rows(result)
        return dict(result.metrics)

    def write_rows(result) -> None:
        atomic_write_text(run.output_dir / "answers.jsonl", "".join(json.dumps(r) + "\n" for r in result.rows()))

    # ---------------------------------------------------------------- train
    state = fit(run, train, model=model, objective=Stage2Objective(model), loader=loader,
                evaluate=evaluate if questions is not None else None, resume=args.resume,
                stop_after=args.stop_after, title=f"{card.name}: instruction tuning")

    # ---------------------------------------------------------------- save and report
    if questions is not None and state.last_eval and run.is_main:
        table = comparison_table(questions, tuned=state.last_eval, zero_shot=before.metrics if before else None,
                                 blind=image_blind_baseline(questions))
        run.print("\nheld-out VQA exact match (%), per question type\n" + table.markdown())
        if "vqa_accuracy" in state.last_eval:
            run.print(f"held-out VQAv2 accuracy: {state.last_eval['vqa_accuracy']:.1f}%"
                      + (f" (BLIP-2 zero-shot {before.metrics['vqa_accuracy']:.1f}%)"
                         if before is not None and "vqa_accuracy" in before.metrics else ""))
            if before is not None and "vqa_accuracy" in before.metrics:
                state.last_eval["zero_shot/vqa_accuracy"] = before.metrics["vqa_accuracy"]
        state.last_eval.update(table.flat())
    cfg = model.config
    finish_recipe(run, card, "instruct", state, model, task="vqa",
                  include_frozen=not (cfg.vision.pretrained and cfg.llm.path))


if __name__ == "__main__":
    run_main(main)
