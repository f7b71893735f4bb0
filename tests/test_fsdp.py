"""FSDP2 (qformer.sharding) on two CPU gloo ranks.

* Directly through torch.distributed: stage 1's losses, gradients and optimizer steps against
  one process, and an exact resume through full (unsharded) trainable-only state dicts.
* Through ``accelerate launch`` and the stage-1 recipe (fit, checkpoints, evaluation, the final
  save) against the same run under DDP. accelerate 1.x runs an FSDP config as DDP on a CPU
  machine (see qformer/sharding.py), so tests/fsdp_cpu_launch.py changes that one decision.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import NEG_IMG, NEG_TXT, WORLD, B, _batch, _init, _model
from conftest import write_bert_tokenizer
from recipe_fixtures import make_tiny_card
from safetensors.torch import load_file
from test_recipes import REPO, _env, losses

from qformer import Stage1Objective
from qformer.sharding import (
    full_optimizer_state_dict,
    full_state_dict,
    gathered,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    plain,
    shard_,
)

LR = 1e-3


def _optimizer(m):
    # AdamW's first steps move each weight by ~lr * sign(grad): with the default eps a gradient of
    # ~1e-9 whose last bits differ between 1 and 2 processes flips the update; eps=1e-3 keeps the
    # comparison with one process well conditioned (the resume is compared bit for bit anyway).
    return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR, eps=1e-3, weight_decay=0.05)


def _step(objective, m, opt, sl, rank, world):
    o = objective(**_batch(m, sl), rank=rank, world_size=world, negatives=(NEG_IMG[sl], NEG_TXT[sl]))
    o.loss.backward()
    norm = plain(torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1e9))
    return o, float(norm)


def _worker(rank: int, store: str, out: str, frozen: str) -> None:
    _init(rank, store)
    sl = slice(rank * B, (rank + 1) * B)
    m = _model(f"{out}/tok")
    m.vision.requires_grad_(False)  # a frozen tower beside the trainable Q-Former
    objective = Stage1Objective(m)
    plan = shard_(objective, frozen=frozen)
    opt = _optimizer(m)
    o, norm = _step(objective, m, opt, sl, rank, WORLD)
    grads = {n: plain(p.grad).reshape(torch.Size([]) if n == "temp" else plain(p.grad).shape)
             for n, p in m.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad()
    model_sd, optim_sd = full_state_dict(m), full_optimizer_state_dict(objective, opt)
    o2, _ = _step(objective, m, opt, sl, rank, WORLD)
    opt.step()
    after_two = full_state_dict(m)
    with gathered(objective), torch.no_grad():  # a method other than forward on the sharded model
        sims = m.similarity(_batch(m, sl)["pixel_values"], ["a red circle", "two dogs"])
        for _ in range(rank):  # uneven evaluation work: no collective may hide in a forward here
            m.similarity(_batch(m, sl)["pixel_values"], ["a red circle"])
    # resume: a fresh sharded model + optimizer from the step-1 state dicts, then step 2 again
    dist.broadcast_object_list(box := [model_sd, optim_sd], src=0)
    fresh = _model(f"{out}/tok")
    fresh.vision.requires_grad_(False)
    fresh_objective = Stage1Objective(fresh)
    shard_(fresh_objective, frozen=frozen)
    fresh_opt = _optimizer(fresh)
    load_full_state_dict(fresh, box[0])
    load_full_optimizer_state_dict(fresh_objective, fresh_opt, box[1])
    o3, _ = _step(fresh_objective, fresh, fresh_opt, sl, rank, WORLD)
    fresh_opt.step()
    resumed = full_state_dict(fresh)
    torch.save(dict(plan=plan.__dict__, metrics=o.metrics(), metrics2=o2.metrics(), metrics3=o3.metrics(), norm=norm,
                    grads=grads, model_sd=model_sd, after_two=after_two, resumed=resumed, sims=sims),
               f"{out}/fsdp_{rank}.pt")
    dist.destroy_process_group()


def _reference(tok: str):
    m = _model(tok)
    m.vision.requires_grad_(False)
    objective, opt = Stage1Objective(m), _optimizer(m)
    o, norm = _step(objective, m, opt, slice(None), 0, 1)
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad()
    after_one = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    o2, _ = _step(objective, m, opt, slice(None), 0, 1)
    opt.step()
    after_two = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    return m, o, o2, norm, grads, after_one, after_two


@pytest.mark.slow
@pytest.mark.parametrize("frozen", ["shard", "replicate"])
def test_fsdp2_two_gloo_ranks_equal_one_process_and_resume_exactly(tmp_path, frozen):
    write_bert_tokenizer(tmp_path / "tok")
    _spawn_frozen(tmp_path, frozen)
    ranks = [torch.load(tmp_path / f"fsdp_{r}.pt", weights_only=True) for r in range(WORLD)]
    m, ref, ref2, ref_norm, ref_grads, after_one, after_two = _reference(str(tmp_path / "tok"))
    plan = ranks[0]["plan"]
    # one unit per (sharded) tower block, plus the root (which holds the Q-Former)
    assert plan["units"][-1] == "" and not any(u.startswith("model.qformer") for u in plan["units"])
    assert plan["scalars"] == ["model.temp"]
    tower_units = [u for u in plan["units"] if u.startswith("model.vision")]
    if frozen == "shard":
        assert tower_units and not plan["replicated"]
    else:
        assert not tower_units and plan["replicated"] and all(not n.startswith("model.qformer") for n in plan["replicated"])
    for key, ours in (("metrics", ref.metrics()), ("metrics2", ref2.metrics())):
        for k in ("loss_itc", "loss_itm", "loss_itg", "loss"):
            got = sum(r[key][k] for r in ranks) / WORLD  # each rank's loss is its local mean, as under DDP
            assert abs(got - ours[k]) < 1e-5, (key, k, got, ours[k])
    assert all(abs(r["norm"] - ref_norm) < 1e-5 * max(1.0, ref_norm) for r in ranks)
    # FSDP2 reduce-scatters the mean gradient: the full gradient equals one process's on the global batch
    assert set(ranks[0]["grads"]) == set(ref_grads)
    for n, g in ref_grads.items():
        assert torch.allclose(ranks[0]["grads"][n], g, atol=1e-5, rtol=1e-4), (n, (ranks[0]["grads"][n] - g).abs().max())
    # full state dicts: the model's own names and shapes (temp 0-dim), trainable parameters only
    sd = ranks[0]["model_sd"]
    assert set(sd) == set(after_one) and sd["temp"].shape == torch.Size([])
    assert ranks[1]["model_sd"] == {}  # gathered to rank 0 only
    for n, v in after_one.items():
        assert torch.allclose(sd[n], v, atol=1e-5), (n, (sd[n] - v).abs().max())
    for n, v in after_two.items():
        assert torch.allclose(ranks[0]["after_two"][n], v, atol=1e-5), n
        # resume: the fresh model's second step equals the uninterrupted one exactly
        assert torch.equal(ranks[0]["resumed"][n], ranks[0]["after_two"][n]), n
    assert ranks[0]["metrics3"] == ranks[0]["metrics2"]
    with torch.no_grad():
        m.load_state_dict({**m.state_dict(), **ranks[0]["after_two"]})
        sims = m.similarity(_batch(m, slice(0, B))["pixel_values"], ["a red circle", "two dogs"])
    assert torch.allclose(ranks[0]["sims"], sims, atol=1e-5)


def _spawn_frozen(tmp_path, frozen):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), frozen), nprocs=WORLD, join=True)


# ---------------------------------------------------------------------------- through accelerate
def _launch(script: list[str], card: Path, out: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script,
           "--adapter", str(card), "--output-dir", str(out), "--no-progress", "--set", "stage1.batch_size=4",
           "--set", "model.qformer.hidden_dropout=0.1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.slow
def test_recipe_under_accelerate_fsdp2_equals_ddp_and_resumes_exactly(tmp_path):
    """Stage 1 through ``accelerate launch`` with FSDP2 (tests/fsdp_cpu_launch.py: accelerate's
    own FSDP path, with only its CPU-means-DDP decision changed) logs the losses of the same run
    under DDP, writes the same weights, and a run stopped at a checkpoint and resumed equals it."""
    card = make_tiny_card(tmp_path / "tiny")
    fsdp = [str(REPO / "tests" / "fsdp_cpu_launch.py"), str(REPO / "recipes" / "stage1.py")]
    _launch([str(REPO / "recipes" / "stage1.py")], card, tmp_path / "ddp")
    out = _launch(fsdp, card, tmp_path / "fsdp")
    assert "FSDP2: 3 units over 2 ranks" in out  # the tower's 2 blocks + the root
    _launch(fsdp, card, tmp_path / "part", "--stop-after", "3")
    assert "resumed from" in _launch(fsdp, card, tmp_path / "part", "--resume")
    assert sorted((tmp_path / "part" / "checkpoints" / "step-00000003").iterdir()) == [
        tmp_path / "part" / "checkpoints" / "step-00000003" / n for n in ("model", "optimizer.pt", "trainer_state.json")]
    ddp, full, part = (losses(tmp_path / d) for d in ("ddp", "fsdp", "part"))
    assert sorted(ddp) == sorted(full) == sorted(part) == [1, 2, 3, 4, 5, 6]
    for step in ddp:
        for key in ddp[step]:
            assert full[step][key] == pytest.approx(ddp[step][key], abs=1e-5), (step, key)
            assert part[step][key] == pytest.approx(full[step][key], abs=1e-6), (step, key)
    weights = [load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("ddp", "fsdp", "part")]
    assert set(weights[0]) == set(weights[1]) == set(weights[2]) and weights[1]["temp"].shape == torch.Size([])
    for k, v in weights[0].items():
        assert torch.allclose(weights[1][k], v, atol=1e-5) and torch.allclose(weights[2][k], weights[1][k], atol=1e-6), k
