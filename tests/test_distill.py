"""Momentum distillation and MLM in stage 1 (ALBEF / BLIP, ``../shared/docs/blip2-reference.md``
section 11): each loss against a naive loop-based reference (gradients included), the whole
objective over several steps against a naive teacher (a full deep copy, EMA'd by hand, with a
Python list as queue), two gloo ranks against one process, and exact resume through a recipe."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import randomize_, write_bert_tokenizer
from test_model import CAPTIONS, pixels, tiny_config

from qformer import Blip2, Stage1Config, Stage1Objective, losses
from qformer.config import ConfigError
from qformer.momentum import MOMENTUM_MODULES, MomentumTeacher


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_bert_tokenizer(tmp_path_factory.mktemp("tok"))


def _model(tok, seed=0) -> Blip2:
    torch.manual_seed(seed)
    m = Blip2(tiny_config(len(tok), hidden_dropout=0.0, attention_dropout=0.0), tokenizer=tok)
    randomize_(m, seed)
    return m.train()


def _batch(tok, rows, seed=0):
    enc = tok([CAPTIONS[i % len(CAPTIONS)] for i in rows], padding="longest", return_tensors="pt")
    return dict(pixel_values=pixels(len(rows), seed), input_ids=enc.input_ids, attention_mask=enc.attention_mask)


# ---------------------------------------------------------------------------- naive references
def _sim(i_feat: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
    """Max over queries of the dot product, one pair at a time."""
    return torch.stack([i_feat[q] @ t_feat for q in range(i_feat.shape[0])]).max()


def _soft_ce(row: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    z = torch.stack(row)
    return -((z - torch.logsumexp(z, 0)) * target).sum()


def naive_itc_momentum(img, txt, temp, img_m, txt_m, img_keys, txt_keys, pos, *, alpha, eps):
    b, k = txt.shape[0], txt_keys.shape[0]
    total = 0.0
    for r in range(b):
        n_pos = sum(bool(pos[r][c]) for c in range(k))
        hard = torch.tensor([(1 - eps) * float(pos[r][c]) / n_pos + eps / k for c in range(k)])
        for direction in ("i2t", "t2i"):
            if direction == "i2t":
                row = [_sim(img[r], txt_keys[c]) / temp for c in range(k)]
                row_m = [_sim(img_m[r], txt_keys[c]) / temp.detach() for c in range(k)]
            else:
                row = [_sim(img_keys[c], txt[r]) / temp for c in range(k)]
                row_m = [_sim(img_keys[c], txt_m[r]) / temp.detach() for c in range(k)]
            target = alpha * torch.softmax(torch.stack(row_m).detach(), 0) + (1 - alpha) * hard
            total = total + _soft_ce(row, target)
    return total / (2 * b)


def naive_mlm(logit_rows, targets, soft_rows, *, alpha):
    total = 0.0
    for z, t, s in zip(logit_rows, targets, soft_rows):
        logp = z - torch.logsumexp(z, 0)
        total = total + (1 - alpha) * -logp[int(t)] + (alpha * -(logp * s).sum() if s is not None else 0.0)
    return total / len(targets)


# ---------------------------------------------------------------------------- pure losses
@pytest.mark.parametrize("with_ids", [False, True])
def test_itc_momentum_matches_naive_reference_with_grads(with_ids):
    g = torch.Generator().manual_seed(0)
    b, q, e, n = 4, 3, 6, 5
    img = F.normalize(torch.randn(b, q, e, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, e, generator=g), dim=-1).requires_grad_()
    img_m = F.normalize(img.detach() + 0.3 * torch.randn(b, q, e, generator=g), dim=-1)
    txt_m = F.normalize(txt.detach() + 0.3 * torch.randn(b, e, generator=g), dim=-1)
    queue_img = F.normalize(torch.randn(n, q, e, generator=g), dim=-1)
    queue_txt = F.normalize(torch.randn(n, e, generator=g), dim=-1)
    img_keys, txt_keys = torch.cat([img_m, queue_img]), torch.cat([txt_m, queue_txt])
    temp = torch.tensor(0.1, requires_grad=True)
    if with_ids:  # row 0 and 2 show the same image; queue entry 1 too
        ids, ids_q = torch.tensor([0, 1, 0, 2]), torch.tensor([5, 0, 6, 7, 1])
        pos = torch.cat([ids[:, None] == ids[None], ids[:, None] == ids_q[None]], dim=1)
    else:
        pos = torch.cat([torch.eye(b, dtype=torch.bool), torch.zeros(b, n, dtype=torch.bool)], dim=1)
    out = losses.itc_momentum_loss(img, txt, temp, image_feats_m=img_m, text_feats_m=txt_m, image_keys=img_keys,
                                   text_keys=txt_keys, positives=pos, alpha=0.4, label_smoothing=0.1)
    ref = naive_itc_momentum(img, txt, temp, img_m, txt_m, img_keys, txt_keys, pos, alpha=0.4, eps=0.1)
    assert out.sim_i2t.shape == out.sim_i2t_m.shape == (b, b + n)
    assert torch.allclose(out.loss, ref, atol=1e-5), (out.loss, ref)
    for a, r in zip(torch.autograd.grad(out.loss, [img, txt, temp]), torch.autograd.grad(ref, [img, txt, temp])):
        assert torch.allclose(a, r, atol=1e-5), (a - r).abs().max()
    assert 0.5 < out.loss.item() < 10
    # alpha 0 with the online features as keys: exactly BLIP-2's ITC (label-smoothed) on those logits
    out0 = losses.itc_momentum_loss(img, txt, temp, image_feats_m=img, text_feats_m=txt, image_keys=img.detach(),
                                    text_keys=txt.detach(), positives=pos[:, :b], alpha=0.0, label_smoothing=0.1)
    plain = losses.itc_loss(img, txt, temp, image_ids=ids if with_ids else None, label_smoothing=0.1)
    assert torch.allclose(out0.loss, plain.loss, atol=1e-6)


def test_mlm_mask_follows_bert_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    special = [0, 1, 2, 3, 4]
    ids = torch.randint(5, 300, (200, 50), generator=g)
    ids[:, 0], ids[:, -5:] = 2, 0  # [CLS] first, padding last
    masked, labels = losses.mlm_mask(ids, mask_token_id=4, vocab_size=300, special_ids=special, probability=0.15,
                                     generator=torch.Generator().manual_seed(1))
    again = losses.mlm_mask(ids, mask_token_id=4, vocab_size=300, special_ids=special, probability=0.15,
                            generator=torch.Generator().manual_seed(1))
    assert torch.equal(masked, again[0]) and torch.equal(labels, again[1])
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert not chosen[:, 0].any() and not chosen[:, -5:].any()  # special tokens never chosen
    assert abs(chosen.float().sum().item() / (200 * 44) - 0.15) < 0.01
    n = chosen.sum().item()
    to_mask = (masked[chosen] == 4).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1 - 1 / 300) < 0.02  # a random token may equal the original
    assert abs(1 - to_mask - kept - 0.1) < 0.02


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mlm_loss_matches_naive_reference_with_grads(alpha):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 11, generator=g, requires_grad=True)
    targets = torch.randint(11, (7,), generator=g)
    soft = torch.softmax(torch.randn(7, 11, generator=g), -1)
    out = losses.mlm_loss(logits, targets, soft_targets=soft, alpha=alpha)
    ref = naive_mlm(list(logits), targets, list(soft), alpha=alpha)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(out, logits)[0], torch.autograd.grad(ref, logits)[0], atol=1e-6)
    if alpha == 0:
        assert torch.allclose(out, F.cross_entropy(logits, targets), atol=1e-6)


# ---------------------------------------------------------------------------- the teacher
def test_teacher_copies_only_the_qformer_side_and_shares_the_tower(tok):
    m = _model(tok)
    t = MomentumTeacher(m, momentum=0.9, queue_size=3)
    names = {n for n, _ in t.model.named_parameters()}
    assert {n.split(".")[0] for n in names} == {*MOMENTUM_MODULES, "query_tokens"}
    assert t.model.vision is m.vision and t.model.itm_head is m.itm_head and t.model.temp is m.temp
    online = dict(m.named_parameters())
    assert all(not p.requires_grad and p.data_ptr() != online[n].data_ptr() and torch.equal(p, online[n])
               for n, p in t.model.named_parameters())
    assert not any(n.startswith("vision.") for n in t.state_dict())  # the tower is neither copied nor saved
    # the momentum model runs the online model's code: identical features at init
    b = _batch(tok, range(3))
    with torch.no_grad():
        a = m(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        c = t.model(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert torch.equal(a.image_feats, c.image_feats) and torch.equal(a.text_feats, c.text_feats)
    # EMA: p_m = m p_m + (1 - m) p
    before = {n: p.clone() for n, p in t.model.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1)
    t.update_()
    for n, p in t.model.named_parameters():
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * online[n], atol=1e-6), n
    # the queue is a ring buffer of the newest entries, enqueued only at flush_
    for step in range(3):
        t.defer(torch.full((2, 8, 32), float(step)), torch.full((2, 32), float(step)), torch.tensor([step, step]))
    assert t.queue_filled == 0
    t.flush_()
    img_q, txt_q, ids_q = t.queue(torch.device("cpu"))
    assert t.queue_filled == 3 and t.queue_ptr == 0
    assert sorted(ids_q.tolist()) == [1, 2, 2] and sorted(txt_q[:, 0].tolist()) == [1.0, 2.0, 2.0]
    t.eval()
    t.defer(torch.zeros(2, 8, 32), torch.zeros(2, 32), None)  # an evaluation forward never enqueues
    assert not t._pending


def test_config_defaults_are_blip2_and_bad_values_are_refused(tok):
    c = Stage1Config()
    assert not c.momentum_distill and c.mlm_weight == 0 and c.alpha(0) == 0.4
    assert Stage1Config(momentum_alpha_ramp_steps=10).alpha(5) == pytest.approx(0.2)
    assert Stage1Config(momentum_alpha_ramp_steps=10).alpha(None) == 0.4
    obj = Stage1Objective(_model(tok))
    assert obj.teacher is None and obj.checkpoint_state() == {}
    assert sum(p.numel() for p in obj.parameters()) == sum(p.numel() for p in obj.model.parameters())
    assert set(obj(**_batch(tok, range(2))).metrics()) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    for bad in (dict(momentum=1.5), dict(momentum_alpha=-0.1), dict(momentum_queue_size=8),
                dict(momentum_itm=True), dict(mlm_weight=-1.0), dict(mlm_probability=0.0)):
        with pytest.raises(ConfigError):
            Stage1Config(**bad)


# ---------------------------------------------------------------------------- the whole objective
def test_objective_with_momentum_queue_and_mlm_matches_a_naive_teacher(tok):
    """Three steps: ITC (momentum keys + queue, soft targets, alpha ramping) and MLM (soft
    momentum targets) from the objective equal a naive composition (a full deep-copied teacher,
    EMA'd by hand, a list as queue, loop-based losses), losses and every gradient."""
    m = _model(tok)
    ref = copy.deepcopy(m)
    ref_teacher = copy.deepcopy(m)  # naive: the whole model, tower included
    obj = Stage1Objective(m, momentum_distill=True, momentum=0.8, momentum_alpha_ramp_steps=2,
                          momentum_queue_size=5, mlm_weight=0.5, mlm_probability=0.4)
    b, q = 3, m.num_query_tokens
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []
    noise = torch.Generator().manual_seed(9)
    for step in range(3):
        batch = _batch(tok, range(step, step + b), seed=step)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        neg = (torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
        special = [*tok.all_special_ids, m.config.dec_token_id]
        masked, labels = losses.mlm_mask(ids, mask_token_id=tok.mask_token_id, vocab_size=len(tok),
                                         special_ids=special, probability=0.4,
                                         generator=torch.Generator().manual_seed(step))
        assert (labels != -100).any()
        out = obj(**batch, negatives=neg, step=step, generator=torch.Generator().manual_seed(step))
        assert torch.equal(out.mlm_labels, labels)  # the objective masks with the step's generator
        out.loss.backward()

        # -------- the naive reference
        alpha = 0.4 * min(1.0, step / 2)
        plain = Stage1Objective(ref)(**batch, negatives=neg)  # ITM and ITG do not change with momentum
        emb = ref.embed_image(batch["pixel_values"])
        feats = ref(image_embeds=emb, input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            emb_m = ref_teacher.embed_image(batch["pixel_values"])
            feats_m = ref_teacher(image_embeds=emb_m, input_ids=ids, attention_mask=mask)
        img_keys = torch.cat([feats_m.image_feats, *[e[0][None] for e in queue]])
        txt_keys = torch.cat([feats_m.text_feats, *[e[1][None] for e in queue]])
        pos = torch.cat([torch.eye(b, dtype=torch.bool), torch.zeros(b, len(queue), dtype=torch.bool)], dim=1)
        itc = naive_itc_momentum(feats.image_feats, feats.text_feats, ref.temp, feats_m.image_feats,
                                 feats_m.text_feats, img_keys, txt_keys, pos, alpha=alpha, eps=0.1)

        def text_states(model, image_embeds):
            qm = torch.cat([torch.ones(b, q, dtype=mask.dtype), mask], dim=1)
            return model.qformer(input_ids=masked, query_embeds=model.query_tokens.expand(b, -1, -1),
                                 attention_mask=qm, image_kv=model.qformer.image_kv(image_embeds)).hidden[:, q:]

        h = text_states(ref, emb)
        with torch.no_grad():
            h_m = text_states(ref_teacher, emb_m)
        where = (labels != -100).nonzero().tolist()
        mlm = naive_mlm([ref.lm_logits(h[i, j]) for i, j in where], [labels[i, j] for i, j in where],
                        [torch.softmax(ref_teacher.lm_logits(h_m[i, j]), -1) for i, j in where], alpha=alpha)
        total = itc + plain.loss_itm + plain.loss_itg + 0.5 * mlm
        total.backward()
        assert out.loss_itc.item() == pytest.approx(itc.item(), abs=1e-5), step
        assert out.loss_mlm.item() == pytest.approx(mlm.item(), abs=1e-5), step
        assert out.loss.item() == pytest.approx(total.item(), abs=1e-5), step
        assert out.sim_i2t.shape == (b, b + len(queue))
        ref_params = dict(ref.named_parameters())
        for n, p in m.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad, ref_params[n].grad, atol=1e-5, rtol=1e-4), (step, n)

        # -------- an "optimizer step" (the same random move for both), then EMA and queue
        with torch.no_grad():
            for (n, p), (_, r) in zip(m.named_parameters(), ref.named_parameters()):
                if p.requires_grad:
                    d = 0.05 * torch.randn(p.shape, generator=noise)
                    p.add_(d)
                    r.add_(d)
                p.grad = r.grad = None
            obj.after_optimizer_step(step)
            for n, p_m in ref_teacher.named_parameters():
                p_m.copy_(0.8 * p_m + 0.2 * ref_params[n])
        queue = (queue + list(zip(feats_m.image_feats, feats_m.text_feats)))[-5:]
        teacher = dict(obj.teacher.model.named_parameters())
        ref_t = dict(ref_teacher.named_parameters())
        assert all(torch.allclose(p, ref_t[n], atol=1e-6) for n, p in teacher.items())
    assert obj.teacher.queue_filled == 5


@pytest.mark.parametrize("momentum_itm", [False, True])
def test_itm_negatives_come_from_the_similarities_the_option_names(tok, monkeypatch, momentum_itm):
    """Default: ITC's logits (online features against the momentum keys, as ALBEF/BLIP);
    momentum_itm: the momentum model's own similarities. Only the global batch's columns."""
    m = _model(tok)
    obj = Stage1Objective(m, momentum_distill=True, momentum_itm=momentum_itm, momentum_queue_size=4)
    with torch.no_grad():  # a teacher whose similarities differ from the online ones
        for p in obj.teacher.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    b = _batch(tok, range(4))
    obj(**b, generator=torch.Generator().manual_seed(0))
    obj.after_optimizer_step(0)  # 4 queue entries: 8 columns, of which 4 may be drawn
    captured = {}
    original = losses.itc_momentum_loss

    def spy(*args, **kwargs):
        captured["itc"] = original(*args, **kwargs)
        return captured["itc"]

    monkeypatch.setattr(losses, "itc_momentum_loss", spy)
    out = obj(**b, generator=torch.Generator().manual_seed(5))
    itc = captured["itc"]
    assert itc.sim_i2t.shape == (4, 8)
    pos = torch.eye(4, dtype=torch.bool)
    draws = {flag: losses.sample_itm_negatives(*(sims[:, :4] for sims in pair), pos,
                                               generator=torch.Generator().manual_seed(5))
             for flag, pair in ((False, (itc.sim_i2t, itc.sim_t2i)), (True, (itc.sim_i2t_m, itc.sim_t2i_m)))}
    assert torch.equal(out.neg_image_idx, draws[momentum_itm][0])
    assert torch.equal(out.neg_text_idx, draws[momentum_itm][1])
    assert not torch.equal(torch.cat(draws[True]), torch.cat(draws[False]))  # the option matters here


def test_checkpoint_state_round_trip_and_mismatch(tok):
    m = _model(tok)
    obj = Stage1Objective(m, momentum_distill=True, momentum_queue_size=4)
    obj(**_batch(tok, range(3)), generator=torch.Generator().manual_seed(0))
    obj.after_optimizer_step(0)
    state = obj.checkpoint_state()
    assert state["queue.position"].tolist() == [3, 3]
    other = Stage1Objective(_model(tok, seed=1), momentum_distill=True, momentum_queue_size=4)
    other.load_checkpoint_state(state)
    again = other.checkpoint_state()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    with pytest.raises(ConfigError, match="momentum_queue_size"):
        Stage1Objective(m, momentum_distill=True, momentum_queue_size=6).load_checkpoint_state(state)
    with pytest.raises(ConfigError, match="momentum_distill is off"):
        Stage1Objective(m).load_checkpoint_state(state)


# ---------------------------------------------------------------------------- two gloo ranks
WORLD, B = 2, 3
NEG_IMG = torch.tensor([4, 2, 0, 1, 5, 3])
NEG_TXT = torch.tensor([3, 0, 5, 2, 1, 0])
RANK_CAPTIONS = [  # per rank the same number of ITG targets (ITG is a per-token mean); MLM needs no such care
    "a red circle left of a blue square", "two dogs", "a cat on a sofa",
    "a man riding a bus", "three cats in the snow", "a photo of a dog",
]
OPTIONS = dict(momentum_distill=True, momentum=0.7, momentum_queue_size=8, mlm_weight=1.0, mlm_probability=0.3)


def _masks(m: Blip2, batch, step):
    special = [*m.tokenizer.all_special_ids, m.config.dec_token_id]
    return losses.mlm_mask(batch["input_ids"], mask_token_id=m.tokenizer.mask_token_id, vocab_size=len(m.tokenizer),
                           special_ids=special, probability=0.3, generator=torch.Generator().manual_seed(10 + step))


def _rank_batch(m: Blip2, step: int):
    texts = RANK_CAPTIONS[3 * step:] + RANK_CAPTIONS[:3 * step]  # step 1: the halves swap ranks
    enc = m.tokenizer(texts, padding="longest", return_tensors="pt")
    return dict(pixel_values=pixels(WORLD * B, step), input_ids=enc.input_ids, attention_mask=enc.attention_mask)


def _two_steps(m: Blip2, sl: slice, rank: int, world: int) -> dict:
    """Two steps with momentum, queue and MLM; between them a gradient step (DDP's average)."""
    obj = Stage1Objective(m, **OPTIONS)
    res = {}
    for step in range(2):
        full = _rank_batch(m, step)
        masked, labels = _masks(m, full, step)
        batch = {k: v[sl] for k, v in full.items()}
        out = obj(**batch, rank=rank, world_size=world, negatives=(NEG_IMG[sl], NEG_TXT[sl]), step=step + 1,
                  mlm_inputs=(masked[sl], labels[sl]))
        out.loss.backward()
        res[step] = dict(metrics=out.metrics(), grads={n: p.grad.clone() for n, p in m.named_parameters()
                                                       if p.grad is not None})
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    if world > 1:
                        dist.all_reduce(p.grad)
                        p.grad /= world
                    p.sub_(0.5 * p.grad)
                    p.grad = None
        obj.after_optimizer_step(step)
    res["state"] = obj.checkpoint_state()
    return res


def _rank_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    from qformer.tokenizer import load_qformer_tokenizer

    m = _model(load_qformer_tokenizer(os.path.join(out, "tok")))
    torch.save(_two_steps(m, slice(rank * B, (rank + 1) * B), rank, WORLD), f"{out}/r{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_momentum_queue_and_mlm(tmp_path):
    from qformer.tokenizer import load_qformer_tokenizer

    write_bert_tokenizer(tmp_path / "tok")
    mp.spawn(_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(WORLD)]
    m = _model(load_qformer_tokenizer(str(tmp_path / "tok")))
    # the masks fall unevenly over the ranks: MLM's mean is still the global one
    counts = [int((_masks(m, _rank_batch(m, 0), 0)[1][r * B:(r + 1) * B] != -100).sum())
              for r in range(WORLD)]
    assert counts[0] != counts[1], counts
    ref = _two_steps(m, slice(None), 0, 1)
    for step in range(2):
        for k in ("loss_itc", "loss_itm", "loss_itg", "loss_mlm", "loss"):
            got = sum(r[step]["metrics"][k] for r in ranks) / WORLD
            assert got == pytest.approx(ref[step]["metrics"][k], abs=1e-5), (step, k)
        for n, g in ref[step]["grads"].items():
            got = sum(r[step]["grads"][n] for r in ranks) / WORLD
            assert torch.allclose(got, g, atol=1e-5, rtol=1e-4), (step, n, (got - g).abs().max())
    # every rank holds the one-process teacher and queue (the same global features enqueued)
    for r in ranks:
        assert r["state"].keys() == ref["state"].keys()
        for k, v in ref["state"].items():
            assert torch.allclose(r["state"][k].float(), v.float(), atol=1e-5), k


# ---------------------------------------------------------------------------- exact resume
@pytest.mark.slow
def test_resume_with_momentum_queue_and_mlm_is_exact(tmp_path_factory, tmp_path):
    """A recipe run stopped at a checkpoint and resumed logs the losses of an uninterrupted
    run, with momentum distillation, a queue and MLM on (EMA weights and queue are checkpointed)."""
    from recipe_fixtures import make_tiny_card
    from test_recipes import losses as logged
    from test_recipes import run_recipe

    card = make_tiny_card(tmp_path_factory.mktemp("tiny"))
    common = ["--set", "stage1.eval_every=1000", "--set", "model.qformer.hidden_dropout=0.1",
              "--momentum-distill", "true", "--momentum-queue-size", "6", "--momentum-alpha-ramp-steps", "3",
              "--mlm-weight", "1.0"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    run_recipe(1, card, full, *common)
    run_recipe(1, card, parts, *common, "--stop-after", "3")
    assert (next((parts / "checkpoints").iterdir()) / "objective_state.safetensors").is_file()
    run_recipe(1, card, parts, *common, "--resume")
    a, b = logged(full), logged(parts)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all("loss_mlm" in row for row in a.values())
    for step in a:
        for key in a[step]:
            assert a[step][key] == pytest.approx(b[step][key], abs=1e-6), (step, key)
