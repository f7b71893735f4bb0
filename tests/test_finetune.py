"""BLIP-2's fine-tuning: a trainable (or partly trainable) vision tower, its layer-wise learning
rates, its activation checkpointing, its persistence (ours and transformers', both ways), and
stage 1 with image ids (retrieval fine-tuning) against a naive reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_, write_bert_tokenizer, write_causal_tokenizer

from qformer import Blip2, Blip2Config, QFormerConfig, Stage1Objective, VisionConfig, losses
from qformer import stage1 as stage1_module
from qformer.adapters import load_adapter
from qformer.cli import build_parser, card_from_args
from qformer.config import ConfigError, LLMConfig
from qformer.persistence import init_from_stage1
from qformer.recipe import check_tower_training
from qformer.stage2 import Stage2Objective, Stage2TextCollator
from qformer.training import TrainConfig, build_optimizer, build_scheduler, param_groups

IMG = 32
CAPTIONS = ["a red circle left of a blue square", "two dogs playing in the snow", "a cat", "a man riding a bus"]
EVA = dict(embed_dim=48, depth=4, num_heads=4, patch_size=8, mlp_ratio=2.0)
HF = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, patch_size=8, qkv_bias=True,
          layer_norm_eps=1e-6)


def vision(backend: str, **kw) -> VisionConfig:
    if backend == "timm":
        return VisionConfig(backend="timm", name="eva_giant_patch14_clip_224", model_kwargs=dict(EVA), image_size=IMG,
                            feature_layer=-2, **kw)
    return VisionConfig(backend="hf", name="blip_2_vision_model", model_kwargs=dict(HF), image_size=IMG, feature_layer=-2,
                        **kw)


def stage1_model(tok, backend: str = "timm", seed: int = 0, **vision_kw) -> Blip2:
    cfg = Blip2Config(
        vision=vision(backend, **vision_kw),
        qformer=QFormerConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                              max_position_embeddings=48, encoder_width=48, num_query_tokens=8, hidden_dropout=0.0,
                              attention_dropout=0.0),
        embed_dim=32, max_txt_len=16, ln_vision_eps=1e-6,
    )
    torch.manual_seed(seed)
    m = Blip2(cfg, tokenizer=tok)
    randomize_(m, seed)
    return m


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_bert_tokenizer(tmp_path_factory.mktemp("tok"))


def pixels(n=4, seed=0):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def batch(tok, n=4, seed=0):
    enc = tok(CAPTIONS[:n], padding="longest", truncation=True, max_length=16, return_tensors="pt")
    return dict(pixel_values=pixels(n, seed), input_ids=enc.input_ids, attention_mask=enc.attention_mask)


def stage1_grads(m: Blip2, tok) -> dict[str, torch.Tensor | None]:
    m.zero_grad(set_to_none=True)
    out = Stage1Objective(m)(**batch(tok), negatives=(torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2])))
    out.loss.backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in m.vision.named_parameters()}


# ---------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("backend", ["timm", "hf"])
@pytest.mark.parametrize("blocks", [0, -1, 2])
def test_tower_gradients_follow_trainable_blocks(tok, backend, blocks):
    m = stage1_model(tok, backend)
    m.set_stage(1, vision_trainable_blocks=blocks)
    m.train()
    grads = stage1_grads(m, tok)
    prefix = "model." + m.vision.block_prefix
    depth = m.vision.num_blocks
    assert depth == 3  # 4 blocks, feature_layer -2

    def trains(name: str) -> bool:
        if blocks == -1:
            return True
        return blocks > 0 and name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) >= depth - blocks

    for name, g in grads.items():
        if trains(name):
            assert g is not None and g.abs().sum() > 0, name
        else:
            assert g is None, name
    assert any(trains(n) for n in grads) == (blocks != 0)
    # the rest of stage 1 trains as before
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad and not n.startswith("vision."))


@pytest.mark.parametrize("backend", ["timm", "hf"])
def test_train_mode_reaches_only_the_trainable_blocks(tok, backend):
    m = stage1_model(tok, backend)
    m.set_stage(1)
    m.train()
    assert not any(mod.training for mod in m.vision.model.modules())  # frozen: as before
    with torch.enable_grad():
        assert not m.vision(pixels(2)).requires_grad  # no graph for a frozen tower
    m.set_stage(1, vision_trainable_blocks=1)
    m.train()
    last = m.vision.blocks[-1]
    assert all(mod.training for mod in last.modules())
    assert not any(mod.training for blk in list(m.vision.blocks)[:-1] for mod in blk.modules())
    assert m.vision(pixels(2)).requires_grad
    m.eval()
    assert not any(mod.training for mod in m.vision.model.modules())
    with torch.no_grad():
        assert not m.vision(pixels(2)).requires_grad


def test_stage2_trains_the_tower_with_the_frozen_llm(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    ltok = write_causal_tokenizer(tmp_path / "opt")
    torch.manual_seed(0)
    llm = OPTForCausalLM(OPTConfig(vocab_size=len(ltok) + 8, hidden_size=48, num_hidden_layers=2, ffn_dim=96,
                                   num_attention_heads=4, max_position_embeddings=96, word_embed_proj_dim=48,
                                   pad_token_id=ltok.pad_token_id, bos_token_id=ltok.bos_token_id,
                                   eos_token_id=ltok.eos_token_id))
    llm.save_pretrained(str(tmp_path / "opt"))
    cfg = Blip2Config(vision=vision("timm"),
                      qformer=QFormerConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                                            intermediate_size=128, max_position_embeddings=48, encoder_width=48,
                                            num_query_tokens=8, text_input=False),
                      stage1_heads=False, llm=LLMConfig(path=str(tmp_path / "opt"), dtype="float32", prompt="a photo of"))
    m = Blip2(cfg)
    m.set_stage(2, vision_trainable_blocks=-1)
    m.train()
    b = Stage2TextCollator(m.llm_tokenizer, cfg.llm, encoder_decoder=False)(CAPTIONS[:3])
    Stage2Objective(m)(pixel_values=pixels(3), **b).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.vision.parameters())
    assert all(p.grad is None for p in m.llm.parameters())  # the LLM stays frozen
    assert not m.llm.training


def test_a_half_precision_tower_is_refused(tok):
    m = stage1_model(tok, dtype="bfloat16")
    m.set_stage(1)  # frozen: fine, as before
    with pytest.raises(ConfigError, match="float32"):
        m.set_stage(1, vision_trainable_blocks=-1)
    with pytest.raises(ConfigError, match="vision_trainable_blocks"):
        stage1_model(tok).set_stage(1, vision_trainable_blocks=4)  # only 3 blocks kept


# ---------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("backend", ["timm", "hf"])
@pytest.mark.parametrize("blocks", [-1, 2])
def test_tower_checkpointing_keeps_gradients_and_saves_memory(tok, backend, blocks):
    m = stage1_model(tok, backend)
    m.set_stage(1, vision_trainable_blocks=blocks)
    m.train()

    def run() -> tuple[dict, int]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            feats = m.vision(pixels(2))
        feats.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in m.vision.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
        return grads, sum(saved)

    plain, kept_plain = run()
    m.vision.set_gradient_checkpointing(True)
    ckpt, kept_ckpt = run()
    m.vision.set_gradient_checkpointing(False)
    again, _ = run()
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-5), n
        assert torch.equal(plain[n], again[n]), n
    assert kept_ckpt < 0.6 * kept_plain, (kept_ckpt, kept_plain)


# ---------------------------------------------------------------------------- layer-wise lr decay
def expected_depth(name: str) -> int:
    """Naive reference: 'vision.model.blocks.I.*' -> I + 1, any other tower parameter -> 0."""
    parts = name.split(".")
    return int(parts[3]) + 1 if parts[2] == "blocks" else 0


@pytest.mark.parametrize("blocks", [-1, 2])
def test_layer_decay_assigns_the_documented_rates(tok, blocks):
    m = stage1_model(tok)
    m.set_stage(1, vision_trainable_blocks=blocks)
    train = TrainConfig(lr=1e-4, vision_lr=2e-5, vision_layer_decay=0.8, weight_decay=0.05, warmup_steps=10,
                        max_steps=100, warmup_lr=1e-6, min_lr=1e-5)
    opt = build_optimizer(m, train)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    d = m.vision.num_blocks
    seen = 0
    for name, p in m.named_parameters():
        if not p.requires_grad:
            assert id(p) not in group_of, name
            continue
        g = group_of[id(p)]
        no_decay = p.ndim < 2 or name.endswith(".bias")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
        if name.startswith("vision."):
            seen += 1
            depth = expected_depth(name)
            assert g["lr"] == pytest.approx(2e-5 * 0.8 ** (d + 1 - depth)), name
            assert g["name"] == f"vision.layer_{depth}.{'no_decay' if no_decay else 'decay'}"
        else:
            assert g["lr"] == pytest.approx(1e-4), name
    assert seen == sum(p.requires_grad for p in m.vision.parameters()) > 0
    # the last block at vision_lr * decay, the embeddings (whole tower only) at vision_lr * decay^(D+1)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups if "name" in g}
    assert lrs[f"vision.layer_{d}.decay"] == pytest.approx(2e-5 * 0.8)
    assert ("vision.layer_0.decay" in lrs) == (blocks == -1)
    # the schedule scales every group alike: the ratios hold at every step
    sched = build_scheduler(opt, train)
    for _ in range(37):
        opt.step()
        sched.step()
    now = [g["lr"] for g in opt.param_groups]
    first = [g["initial_lr"] for g in opt.param_groups]
    assert all(math.isclose(a / now[0], b / first[0], rel_tol=1e-9) for a, b in zip(now, first))


def test_frozen_tower_keeps_the_two_groups(tok):
    m = stage1_model(tok)
    m.set_stage(1)
    groups = param_groups(m, 0.05)
    assert len(groups) == 2 and all("lr" not in g for g in groups)
    opt = build_optimizer(m, TrainConfig(vision_layer_decay=0.5))
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-4]


def test_train_config_and_card_fields(tmp_path):
    for bad in (dict(vision_layer_decay=0.0), dict(vision_layer_decay=1.5), dict(vision_lr=-1.0),
                dict(vision_trainable_blocks=-2), dict(vision_trainable_blocks=True)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    p = build_parser(2, "x")
    args = p.parse_args(["--vision-trainable-blocks", "-1", "--vision-lr", "null", "--vision-layer-decay", "0.95"])
    card = card_from_args(args, 2)
    t = card.train_config(2)
    assert (t.vision_trainable_blocks, t.vision_lr, t.vision_layer_decay) == (-1, None, 0.95)
    with pytest.raises(ConfigError, match="cache_features"):
        check_tower_training(card, 2)  # the toy card caches the frozen tower's features
    card = card_from_args(p.parse_args(["--vision-trainable-blocks", "-1", "--cache-features", "false"]), 2)
    assert card.data.cache_features is False  # "false" on the command line overrides the card's true
    check_tower_training(card, 2)
    card = load_adapter("eva-vit-g_opt-2.7b", ["stage2.vision_trainable_blocks=-1"])
    with pytest.raises(ConfigError, match="float32"):
        check_tower_training(card, 2)  # the card's tower is bf16
    check_tower_training(load_adapter("eva-vit-g_opt-2.7b", ["stage2.vision_trainable_blocks=-1",
                                                             "model.vision.dtype=float32"]), 2)


# ---------------------------------------------------------------------------- persistence
def _train_step(m: Blip2, tok) -> None:
    opt = build_optimizer(m, TrainConfig(lr=1e-2, vision_layer_decay=0.9, warmup_steps=0))
    stage1_grads(m, tok)
    opt.step()


@pytest.mark.parametrize("backend", ["timm", "hf"])
def test_unfrozen_tower_round_trips_ours_and_transformers(tmp_path, tok, backend):
    from transformers import Blip2ForImageTextRetrieval

    m = stage1_model(tok, backend)
    before = {k: v.clone() for k, v in m.vision.state_dict().items()}
    m.set_stage(1, vision_trainable_blocks=-1)
    m.train()
    _train_step(m, tok)
    m.eval()
    trained = m.vision.state_dict()
    assert all(not torch.equal(before[k], trained[k]) for k in trained)  # every tower tensor moved
    # our format: a trainable tower is written even by a training checkpoint (include_frozen=False)
    m.save_pretrained(tmp_path / "ours", include_frozen=False)
    back = Blip2.from_pretrained(tmp_path / "ours").eval()
    assert back.vision.state_dict().keys() == trained.keys()
    assert all(torch.equal(back.vision.state_dict()[k], v) for k, v in trained.items())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))
    # transformers: Blip2ForImageTextRetrieval carries the tower; and back to ours
    m.export_transformers(tmp_path / "hf")
    hf = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf")).eval()
    again = Blip2.from_pretrained(tmp_path / "hf").eval()
    px = pixels(3, seed=5)
    enc = tok(CAPTIONS[:3], padding="longest", return_tensors="pt")
    with torch.no_grad():
        ours_itm = m.itm(px, CAPTIONS[:3])
        hf_itm = hf(pixel_values=px, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                    use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
        assert torch.allclose(ours_itm, hf_itm, atol=1e-5)
        assert torch.allclose(m.vision(px), again.vision(px), atol=1e-5)
        assert torch.allclose(again.itm(px, CAPTIONS[:3]), ours_itm, atol=1e-5)
        assert torch.allclose(again.similarity(px, CAPTIONS), m.similarity(px, CAPTIONS), atol=1e-5)
    if backend == "hf":  # same tower class both sides: the weights themselves are identical
        assert all(torch.equal(again.vision.state_dict()[k], v) for k, v in trained.items())
        again.export_transformers(tmp_path / "hf2")
        hf2 = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf2"))
        assert all(torch.equal(a, hf2.state_dict()[k]) for k, a in hf.state_dict().items())


def test_frozen_tower_is_still_left_out_of_training_checkpoints(tmp_path, tok):
    weights = tmp_path / "tower.safetensors"
    from safetensors.torch import save_file

    m = stage1_model(tok)
    save_file({k: v.contiguous() for k, v in m.vision.model.state_dict().items()}, str(weights))
    m2 = stage1_model(tok, pretrained=str(weights))
    m2.set_stage(1)
    m2.save_pretrained(tmp_path / "ckpt", include_frozen=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("vision.") for k in f.keys())
    m2.set_stage(1, vision_trainable_blocks=1)
    m2.save_pretrained(tmp_path / "ckpt2", include_frozen=False)
    with safe_open(str(tmp_path / "ckpt2" / "model.safetensors"), "pt") as f:
        assert {k for k in f.keys() if k.startswith("vision.model.")} == {f"vision.model.{k}" for k in
                                                                         m2.vision.model.state_dict()}
    # a tower that came from a saved model (e.g. fine-tuned) is written again by the next stage's
    # checkpoints, even frozen: vision.pretrained would give other weights
    with torch.no_grad():
        m2.vision.blocks[-1].mlp.fc1.weight.add_(1.0)  # "fine-tuned"
    m2.save_pretrained(tmp_path / "ckpt3", include_frozen=False)
    for source, kept in (("ckpt", False), ("ckpt3", True)):
        m3 = stage1_model(tok, seed=1, pretrained=str(weights))
        init_from_stage1(m3, tmp_path / source)
        m3.set_stage(1)
        m3.save_pretrained(tmp_path / f"next-{source}", include_frozen=False)
        with safe_open(str(tmp_path / f"next-{source}" / "model.safetensors"), "pt") as f:
            assert any(k.startswith("vision.") for k in f.keys()) == kept, source
        back = Blip2.from_pretrained(tmp_path / f"next-{source}")
        assert torch.equal(back.vision.blocks[-1].mlp.fc1.weight, m2.vision.blocks[-1].mlp.fc1.weight) == kept


# ---------------------------------------------------------------------------- image ids (retrieval fine-tuning)
def test_image_ids_change_itc_targets_and_itm_negatives_as_a_naive_reference(tok, monkeypatch):
    """Captions of one image are ITC positives of each other (soft targets: uniform over the
    positives, mixed 0.9 / 0.1 with uniform) and never each other's ITM negatives; the
    negatives follow the softmax of the similarities with the positives masked."""
    m = stage1_model(tok).eval()
    ids = torch.tensor([7, 7, 3, 9])  # captions 0 and 1 describe the same image
    b = batch(tok)  # (pixels differ, as two augmented views of one image do; identical rows make the two losses equal)
    obj = Stage1Objective(m)
    with torch.no_grad():
        out = obj(**b, image_ids=ids, generator=torch.Generator().manual_seed(0))
        plain = obj(**b, generator=torch.Generator().manual_seed(0))
    n = 4
    si, st = out.sim_i2t.tolist(), out.sim_t2i.tolist()

    def ce(row, target):
        lse = math.log(sum(math.exp(z) for z in row))
        return -sum(t * (z - lse) for z, t in zip(row, target))

    def naive_itc(use_ids: bool) -> float:
        total = 0.0
        for r in range(n):
            pos = [float(ids[c] == ids[r]) if use_ids else float(c == r) for c in range(n)]
            target = [0.9 * p / sum(pos) + 0.1 / n for p in pos]
            total += ce(si[r], target) + ce(st[r], target)
        return total / (2 * n)

    assert out.loss_itc.item() == pytest.approx(naive_itc(True), rel=1e-5)
    assert plain.loss_itc.item() == pytest.approx(naive_itc(False), rel=1e-5)
    assert abs(naive_itc(True) - naive_itc(False)) > 1e-3  # the ids change the targets

    # ITM negatives: the mask the objective samples with is exactly "same image id" (naive), and
    # the draws follow the naive masked softmax (positives weigh nothing)
    seen = []
    real = losses.sample_itm_negatives

    def spy(sim_i2t, sim_t2i, positives, *, generator=None):
        seen.append(positives.clone())
        return real(sim_i2t, sim_t2i, positives, generator=generator)

    monkeypatch.setattr(stage1_module.losses, "sample_itm_negatives", spy)
    with torch.no_grad():
        for s in range(4):
            o = obj(**b, image_ids=ids, generator=torch.Generator().manual_seed(s + 1))
            assert (ids[o.neg_image_idx] != ids).all() and (ids[o.neg_text_idx] != ids).all()
    naive_mask = torch.tensor([[bool(ids[r] == ids[c]) for c in range(n)] for r in range(n)])
    assert all(torch.equal(mask, naive_mask) for mask in seen) and len(seen) == 4
    counts_img, counts_txt = torch.zeros(n, n), torch.zeros(n, n)
    draws, gen = 3000, torch.Generator().manual_seed(0)
    for _ in range(draws):
        ni, nt = real(out.sim_i2t, out.sim_t2i, seen[0], generator=gen)
        counts_img[torch.arange(n), ni] += 1
        counts_txt[torch.arange(n), nt] += 1
    for r in range(n):
        for counts, row in ((counts_img, st[r]), (counts_txt, si[r])):
            w = [0.0 if ids[c] == ids[r] else math.exp(row[c]) for c in range(n)]
            for c in range(n):
                assert abs(counts[r, c].item() / draws - w[c] / sum(w)) < 0.03, (r, c, counts[r], w)


def test_the_paper_fine_tuning_cards():
    cap = load_adapter("eva-vit-g_opt-2.7b_caption-ft")
    t = cap.train_config(2)
    assert (t.vision_trainable_blocks, t.lr, t.min_lr, t.warmup_steps, t.gradient_checkpointing) == (-1, 1e-5, 0.0, 1000,
                                                                                                      True)
    assert cap.model["llm"]["prompt"] == "a photo of" and cap.model["vision"]["image_size"] == 364
    check_tower_training(cap, 2)
    ret = load_adapter("eva-vit-g_opt-2.7b_retrieval-ft")
    t = ret.train_config(1)
    assert (t.vision_trainable_blocks, t.vision_layer_decay, t.batch_size) == (-1, 0.95, 14)
    assert ret.eval.stage1.k == 128 and ret.model["vision"]["dtype"] == "float32"
    check_tower_training(ret, 1)
