"""Two gloo processes must give exactly what one process gives on the global batch.

Each worker writes its losses and gradients to disk; the test averages them over ranks (as
DDP does) and compares with a single process on the concatenated batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import randomize_, write_bert_tokenizer

from qformer import Blip2, Stage1Objective, losses
from qformer.distributed import gather_rows

WORLD = 2
B = 3  # per rank
CAPTIONS = [  # per rank the same number of ITG targets (ITG is a per-token mean)
    "a red circle left of a blue square", "two dogs", "a cat on a sofa",
    "a man riding a bus", "three cats in the snow", "a photo of a dog",
]


def _init(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(WORLD * B, 5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(WORLD * B, 8, generator=g), dim=-1)
    return img, txt


def _itc_worker(rank: int, store: str, out: str) -> None:
    _init(rank, store)
    img, txt = _features()
    img = img[rank * B : (rank + 1) * B].clone().requires_grad_()
    txt = txt[rank * B : (rank + 1) * B].clone().requires_grad_()
    temp = torch.tensor(0.07, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 0, 3, 4])[rank * B : (rank + 1) * B]
    res = {}
    for name, kw in {"plain": {}, "ids": {"image_ids": ids}}.items():
        o = losses.itc_loss(img, txt, temp, rank=rank, world_size=WORLD, **kw)
        g = torch.autograd.grad(o.loss, [img, txt, temp])
        res[name] = dict(loss=o.loss.detach(), g_img=g[0], g_txt=g[1], g_temp=g[2], sim_i2t=o.sim_i2t.detach())
    # gather_rows: fetch arbitrary global rows, with gradient back to the owner
    local = (torch.arange(B * 4, dtype=torch.float32).view(B, 4) + 100 * rank).requires_grad_()
    index = torch.tensor([[5, 0, 3], [1, 4, 4]][rank])
    rows = gather_rows(local, index, rank=rank, world_size=WORLD)
    (rows * (index[:, None] + 1)).sum().backward()
    res["rows"], res["rows_grad"] = rows.detach(), local.grad
    torch.save(res, f"{out}/itc_{rank}.pt")
    dist.destroy_process_group()


def _spawn(fn, tmp_path: Path) -> None:
    mp.spawn(fn, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)


def test_itc_two_gloo_ranks_equal_one_process(tmp_path):
    _spawn(_itc_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"itc_{r}.pt", weights_only=True) for r in range(WORLD)]
    img, txt = _features()
    img.requires_grad_()
    txt.requires_grad_()
    temp = torch.tensor(0.07, requires_grad=True)
    for name, kw in {"plain": {}, "ids": {"image_ids": torch.tensor([0, 1, 2, 0, 3, 4])}}.items():
        ref = losses.itc_loss(img, txt, temp, **kw)
        g_img, g_txt, g_temp = torch.autograd.grad(ref.loss, [img, txt, temp])
        # DDP averages over ranks: the mean of the rank losses is the global loss ...
        mean_loss = sum(r[name]["loss"] for r in ranks) / WORLD
        assert torch.allclose(mean_loss, ref.loss, atol=1e-6), name
        # ... and each rank's gradient of its own features, averaged, is the global gradient
        got_img = torch.cat([r[name]["g_img"] for r in ranks]) / WORLD
        got_txt = torch.cat([r[name]["g_txt"] for r in ranks]) / WORLD
        got_temp = sum(r[name]["g_temp"] for r in ranks) / WORLD
        assert torch.allclose(got_img, g_img, atol=1e-6), name
        assert torch.allclose(got_txt, g_txt, atol=1e-6), name
        assert torch.allclose(got_temp, g_temp, atol=1e-5), name
        assert torch.allclose(torch.cat([r[name]["sim_i2t"] for r in ranks]), ref.sim_i2t, atol=1e-6)
    # gather_rows
    full = torch.cat([torch.arange(B * 4, dtype=torch.float32).view(B, 4) + 100 * r for r in range(WORLD)])
    assert torch.equal(ranks[0]["rows"], full[[5, 0, 3]]) and torch.equal(ranks[1]["rows"], full[[1, 4, 4]])
    expected_grad = torch.zeros(WORLD * B, 4)
    for idx in ([5, 0, 3], [1, 4, 4]):
        for i in idx:
            expected_grad[i] += i + 1
    assert torch.equal(torch.cat([r["rows_grad"] for r in ranks]), expected_grad)


# ---------------------------------------------------------------------------- full stage 1
NEG_IMG = torch.tensor([4, 2, 0, 1, 5, 3])  # global negatives, several owned by the other rank
NEG_TXT = torch.tensor([3, 0, 5, 2, 1, 0])


def _model(tok_dir: str) -> Blip2:
    from test_model import tiny_config

    from qformer.tokenizer import load_qformer_tokenizer

    tok = load_qformer_tokenizer(tok_dir)
    torch.manual_seed(0)
    m = Blip2(tiny_config(len(tok), hidden_dropout=0.0, attention_dropout=0.0), tokenizer=tok)
    randomize_(m, 0)
    return m.train()


def _batch(m: Blip2, sl: slice):
    enc = m.tokenizer(CAPTIONS[sl], padding="longest", return_tensors="pt")
    px = torch.randn(WORLD * B, 3, 32, 32, generator=torch.Generator().manual_seed(1))[sl]
    return dict(pixel_values=px, input_ids=enc.input_ids, attention_mask=enc.attention_mask)


def _stage1_worker(rank: int, store: str, out: str) -> None:
    _init(rank, store)
    m = _model(os.path.join(out, "tok"))
    sl = slice(rank * B, (rank + 1) * B)
    o = Stage1Objective(m)(**_batch(m, sl), rank=rank, world_size=WORLD, negatives=(NEG_IMG[sl], NEG_TXT[sl]))
    o.loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    torch.save(dict(metrics=o.metrics(), grads=grads, itm=o.itm_logits.detach()), f"{out}/s1_{rank}.pt")
    # unpinned sampling across ranks runs and never picks a positive
    o = Stage1Objective(m)(**_batch(m, sl), rank=rank, world_size=WORLD)
    assert (o.neg_image_idx != torch.arange(B) + rank * B).all()
    dist.destroy_process_group()


@pytest.mark.slow
def test_stage1_two_gloo_ranks_equal_one_process(tmp_path):
    """ITC + ITM (negatives across ranks, only the chosen rows gathered) + ITG: the rank-
    averaged losses and gradients equal one process on the global batch."""
    write_bert_tokenizer(tmp_path / "tok")
    _spawn(_stage1_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"s1_{r}.pt", weights_only=True) for r in range(WORLD)]
    m = _model(str(tmp_path / "tok"))
    targets = [int(_batch(m, slice(r * B, (r + 1) * B))["attention_mask"][:, 1:].sum()) for r in range(WORLD)]
    assert targets[0] == targets[1]
    ref = Stage1Objective(m)(**_batch(m, slice(None)), rank=0, world_size=1, negatives=(NEG_IMG, NEG_TXT))
    ref.loss.backward()
    for k in ("loss_itc", "loss_itm", "loss_itg", "loss"):
        got = sum(r["metrics"][k] for r in ranks) / WORLD
        assert abs(got - ref.metrics()[k]) < 1e-5, (k, got, ref.metrics()[k])
    itm = torch.cat([r["itm"].view(3, B, 2) for r in ranks], dim=1).view(-1, 2)
    assert torch.allclose(itm, ref.itm_logits, atol=1e-5)
    names = {n for n, p in m.named_parameters() if p.grad is not None}
    assert names == set(ranks[0]["grads"]) == set(ranks[1]["grads"])
    for n, p in m.named_parameters():
        if p.grad is None:
            continue
        got = sum(r["grads"][n] for r in ranks) / WORLD
        assert torch.allclose(got, p.grad, atol=1e-5, rtol=1e-4), (n, (got - p.grad).abs().max())
