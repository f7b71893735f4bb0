#!/usr/bin/env python
"""Memory of a fine-tuning step with the vision tower unfrozen (BLIP-2's fine-tuning recipes),
with and without the tower's activation checkpointing.

What is measured
    1. A small stage-1 model (an EVA-style timm tower 384 wide, 12 blocks, 224 px / 16 px patches =
       197 tokens; a 4-layer Q-Former 256 wide with 32 queries; batch 8) takes full training steps
       (ITC + ITM + ITG, backward, AdamW with the tower's layer-wise lr decay 0.95) with the tower
       frozen (BLIP-2 pre-training), unfrozen, unfrozen + ``gradient_checkpointing``, each in fp32 and
       under bf16 autocast (the recipes' ``mixed_precision=bf16``; the weights stay fp32). Every
       variant runs in its own process: one warm-up step (it allocates AdamW's state), then the
       kernel's peak-RSS counter is reset (and ``malloc_trim`` returns freed memory) and one more
       step runs. "step peak" is the peak RSS during that step minus the RSS before it (activations,
       gradients, temporaries); "resident" is the RSS before it (weights, AdamW state, the
       interpreter and libraries). The exact byte counts of parameters and AdamW state are listed too.
    2. EVA ViT-g/14 (1408 wide, BLIP-2's 39 of 40 blocks) is too large for this machine's budget, so
       its numbers are estimated: the bytes one real-size EVA-g block saves for backward per image
       are *measured* (``torch.autograd.graph.saved_tensors_hooks``, unique storages) at 224 px
       (257 tokens) and 364 px (677 tokens, the fine-tuning resolution), fp32 and bf16 autocast;
       then tower memory per GPU = fp32 weights + fp32 gradients + AdamW state (16 bytes per
       parameter) + activations: 39 x per-block bytes x batch without checkpointing, or, with it,
       the 39 block inputs kept plus one block's activations during its recompute.

    python benchmarks/vision_finetune_memory.py               # both parts (~2 minutes on 2 cores)
    python benchmarks/vision_finetune_memory.py --skip-estimate
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = {
    # name: (vision_trainable_blocks, gradient checkpointing, bf16 autocast)
    "frozen tower, fp32": (0, False, False),
    "unfrozen tower, fp32": (-1, False, False),
    "unfrozen tower + checkpointing, fp32": (-1, True, False),
    "frozen tower, bf16 autocast": (0, False, True),
    "unfrozen tower, bf16 autocast": (-1, False, True),
    "unfrozen tower + checkpointing, bf16 autocast": (-1, True, True),
}
SMALL_TOWER = dict(embed_dim=384, depth=13, num_heads=6, patch_size=16, mlp_ratio=4.0)  # 12 kept (feature_layer -2)
BATCH, IMAGE = 8, 224
# EVA ViT-g/14 as BLIP-2 uses it (LAVIS create_eva_vit_g): 39 of 40 blocks.
EVA_G = dict(embed_dim=1408, num_heads=16, mlp_ratio=4.3637, patch_size=14)
EVA_G_BLOCKS = 39


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def measure_variant(name: str, workdir: Path) -> dict:
    """One variant, in this (fresh) process: see the module docstring."""
    import gc

    C.worker_setup()
    import torch

    from qformer import Blip2, Blip2Config, QFormerConfig, Stage1Objective, VisionConfig
    from qformer.testing import captions, pixels, write_bert_tokenizer
    from qformer.training import TrainConfig, build_optimizer

    blocks, ckpt, bf16 = VARIANTS[name]
    tok = write_bert_tokenizer(workdir / f"tok-{abs(hash(name))}")
    cfg = Blip2Config(
        vision=VisionConfig(backend="timm", name="eva_giant_patch14_clip_224", model_kwargs=dict(SMALL_TOWER),
                            image_size=IMAGE, feature_layer=-2),
        qformer=QFormerConfig(vocab_size=len(tok), hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                              max_position_embeddings=64, encoder_width=SMALL_TOWER["embed_dim"], num_query_tokens=32),
        embed_dim=128, max_txt_len=24,
    )
    torch.manual_seed(0)
    model = Blip2(cfg, tokenizer=tok)
    model.set_stage(1, vision_trainable_blocks=blocks)
    model.qformer.set_gradient_checkpointing(False)  # the tower's checkpointing alone is measured
    if model.vision.trains:
        model.vision.set_gradient_checkpointing(ckpt)
    model.train()
    train = TrainConfig(lr=1e-5, vision_layer_decay=0.95, warmup_steps=0)
    opt = build_optimizer(model, train)
    objective = Stage1Objective(model)
    enc = tok(captions(BATCH, words=(6, 16), seed=1), padding="longest", truncation=True, max_length=24,
              return_tensors="pt")
    batch = dict(pixel_values=pixels(BATCH, IMAGE, seed=2), input_ids=enc.input_ids, attention_mask=enc.attention_mask)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = objective(**batch, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    step()  # warm-up: AdamW's state is allocated here
    gc.collect()
    _malloc_trim()
    C.reset_peak_rss()
    before = C.rss_bytes()
    loss = step()
    peak = C.peak_rss_bytes()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tower_trainable = sum(p.numel() for p in model.vision.parameters() if p.requires_grad)
    adam = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"variant": name, "loss": loss, "resident": before, "step_peak": peak - before, "peak": peak,
            "params": params, "trainable": trainable, "tower_trainable": tower_trainable, "adam_bytes": adam,
            "optimizer_groups": len(opt.param_groups)}


def eva_g_block_bytes() -> dict:
    """Bytes one real-size EVA-g block saves for backward per image (unique storages)."""
    C.worker_setup()
    import timm
    import torch

    out = {}
    for image in (224, 364):
        torch.manual_seed(0)
        model = timm.create_model("eva_giant_patch14_clip_224", pretrained=False, num_classes=0, img_size=image,
                                  depth=1, **EVA_G)
        model.train()
        tokens = (image // 14) ** 2 + 1
        block = model.blocks[0]
        for bf16 in (False, True):
            saved = []
            for b in (1, 2):  # the difference is per image; weights (and autocast's bf16 copies) are per forward
                storages: dict[int, int] = {}

                def pack(t):
                    s = t.untyped_storage()
                    storages[s.data_ptr()] = s.nbytes()
                    return t

                x = torch.randn(b, tokens, EVA_G["embed_dim"], requires_grad=True)  # a block's input (B, N, C)
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = block(x)
                y.float().square().sum().backward()
                saved.append(sum(storages.values()))
            out[f"{image}px {'bf16' if bf16 else 'fp32'}"] = {"tokens": tokens, "bytes": saved[1] - saved[0],
                                                               "per_forward": 2 * saved[0] - saved[1]}
    with torch.device("meta"):
        full = timm.create_model("eva_giant_patch14_clip_224", pretrained=False, num_classes=0, img_size=364,
                                 depth=EVA_G_BLOCKS, **EVA_G)
    out["params"] = sum(p.numel() for p in full.parameters())
    return out


def _child(kind: str, arg: str, workdir: Path) -> dict:
    argv = [sys.executable, __file__, "--child", kind, "--arg", arg, "--workdir", str(workdir)]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise C.WorkerError(f"{kind} {arg!r} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def estimate_rows(block: dict) -> list[list[str]]:
    """EVA ViT-g tower memory per GPU for BLIP-2's fine-tuning batches (see the module docstring)."""
    p = block["params"]
    states = 16 * p  # fp32 weights + fp32 gradients + AdamW exp_avg + exp_avg_sq
    rows = []
    for label, image, b in (("caption fine-tune (LAVIS: 16 / GPU)", 364, 16),
                            ("retrieval fine-tune (LAVIS: 14 / GPU)", 364, 14),
                            ("224 px, 16 / GPU", 224, 16)):
        for precision in ("fp32", "bf16"):
            per_block = block[f"{image}px {precision}"]["bytes"]
            tokens = block[f"{image}px {precision}"]["tokens"]
            plain = EVA_G_BLOCKS * per_block * b
            # the residual stream between blocks stays fp32 under autocast (x + bf16 branch -> fp32)
            ckpt = EVA_G_BLOCKS * b * tokens * EVA_G["embed_dim"] * 4 + per_block * b
            rows.append([label, f"{image}", precision, C.gib(states), C.gib(plain), C.gib(ckpt),
                         C.gib(states + plain), C.gib(states + ckpt)])
    return rows


def run(args) -> C.Section:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_vision_ft_"))
    sec = C.Section(
        title="Fine-tuning with the vision tower unfrozen: memory",
        intro=("BLIP-2's fine-tuning recipes (captioning, VQA, retrieval) train the vision tower with the Q-Former "
               "(`--vision-trainable-blocks -1`). Part 1 measures a small stage-1 model on this CPU; part 2 estimates "
               "EVA ViT-g from one real-size block's measured activations. `python benchmarks/vision_finetune_memory.py`."),
    )
    rows, results = [], []
    for name in VARIANTS:
        C.log(f"vision_finetune_memory: {name}")
        r = _child("variant", name, workdir)
        results.append(r)
        rows.append([name, f"{r['tower_trainable'] / 1e6:.2f}M", f"{r['trainable'] / 1e6:.2f}M", C.gib(r["adam_bytes"]),
                     C.gib(r["resident"]), C.gib(r["step_peak"]), C.gib(r["peak"]), f"{r['loss']:.3f}"])
    sec.add_table(
        f"Small model (tower {SMALL_TOWER['embed_dim']} wide x 12 blocks, {IMAGE} px, batch {BATCH}; Q-Former 256 x 4 "
        "layers): one stage-1 step after a warm-up step",
        ["variant", "tower trainable", "all trainable", "AdamW state", "resident before the step", "step peak (RSS)",
         "peak RSS", "loss"], rows)
    by = {r["variant"]: r for r in results}
    for prec in ("fp32", "bf16 autocast"):
        plain, ck = by[f"unfrozen tower, {prec}"], by[f"unfrozen tower + checkpointing, {prec}"]
        frozen = by[f"frozen tower, {prec}"]
        sec.notes.append(
            f"{prec}: the step's own peak is {C.gib(frozen['step_peak'])} with the tower frozen, "
            f"{C.gib(plain['step_peak'])} unfrozen and {C.gib(ck['step_peak'])} unfrozen with tower checkpointing "
            f"({ck['step_peak'] / max(plain['step_peak'], 1):.2f}x of unfrozen)")
    sec.data["small"] = results
    if not args.skip_estimate:
        C.log("vision_finetune_memory: EVA-g block")
        block = _child("eva_g", "", workdir)
        sec.data["eva_g_block"] = block
        sec.add_table(
            f"EVA ViT-g/14, {EVA_G_BLOCKS} blocks, {block['params'] / 1e9:.3f}B parameters (estimated per GPU from one "
            "measured real-size block; the tower only: the frozen LLM, the Q-Former and their activations come on top)",
            ["recipe batch", "px", "compute", "weights + grads + AdamW (fp32)", "activations", "activations, checkpointed",
             "total", "total, checkpointed"], estimate_rows(block))
        sec.notes.append("measured per image and block (bytes saved for backward): " + ", ".join(
            f"{k}: {v['bytes'] / 2**20:.0f} MiB" for k, v in block.items() if isinstance(v, dict)))
        sec.notes.append("so the paper's recipes need activation checkpointing of the tower on 40-80 GB GPUs (LAVIS's "
                         "caption config sets use_grad_checkpoint: True for the same reason); a half-precision tower "
                         "would halve the weight and gradient bytes but does not train stably (LAVIS #279), so the "
                         "tower stays fp32 and only the compute is bf16.")
    return sec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--skip-estimate", action="store_true", help="skip the EVA ViT-g estimate")
    p.add_argument("--quiet-wait", type=float, default=0.0, help="(accepted for run_all.py; unused: memory only)")
    p.add_argument("--child", choices=["variant", "eva_g"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--arg", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        workdir = args.workdir or Path(tempfile.mkdtemp())
        out = measure_variant(args.arg, workdir) if args.child == "variant" else eva_g_block_bytes()
        print(json.dumps(out))
        return
    C.run_and_save(run, args, "vision_finetune_memory")


if __name__ == "__main__":
    main()
