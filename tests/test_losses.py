"""Each stage-1 loss against a naive, loop-based reference, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qformer import losses

torch.manual_seed(0)


def _feats(b=5, q=4, e=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, q, e, generator=g) * scale, dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, e, generator=g) * scale, dim=-1).requires_grad_()
    temp = torch.tensor(0.07, requires_grad=True)
    return img, txt, temp


def _naive_smoothed_ce(logits_row: list[torch.Tensor], target: list[float]) -> torch.Tensor:
    """-sum_j t_j log softmax(z)_j with everything spelled out."""
    zs = torch.stack(logits_row)
    logp = zs - torch.logsumexp(zs, 0)
    return -(logp * torch.tensor(target)).sum()


def naive_itc(img, txt, temp, *, eps=0.1, image_ids=None):
    b = img.shape[0]
    sim_i2t = [[max(img[i, q] @ txt[j] for q in range(img.shape[1])) / temp for j in range(b)] for i in range(b)]
    sim_t2i = [[max(txt[j] @ img[i, q] for q in range(img.shape[1])) / temp for i in range(b)] for j in range(b)]
    total = 0.0
    for r in range(b):
        if image_ids is None:
            t = [(1 - eps) * (c == r) + eps / b for c in range(b)]
        else:
            pos = [float(image_ids[c] == image_ids[r]) for c in range(b)]
            t = [(1 - eps) * p / sum(pos) + eps / b for p in pos]
        total = total + _naive_smoothed_ce(sim_i2t[r], t) + _naive_smoothed_ce(sim_t2i[r], t)
    return total / (2 * b)


@pytest.mark.parametrize("with_ids", [False, True])
def test_itc_matches_naive_reference_with_grads(with_ids):
    img, txt, temp = _feats()
    ids = torch.tensor([0, 1, 0, 2, 1]) if with_ids else None
    out = losses.itc_loss(img, txt, temp, image_ids=ids)
    ref = naive_itc(img, txt, temp, image_ids=ids)
    assert torch.allclose(out.loss, ref, atol=1e-5), (out.loss, ref)
    g_ours = torch.autograd.grad(out.loss, [img, txt, temp])
    g_ref = torch.autograd.grad(ref, [img, txt, temp])
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # the loss is far from trivial values
    assert 0.5 < out.loss.item() < 10


def test_itc_soft_targets_reduce_to_label_smoothing_for_unique_ids():
    img, txt, temp = _feats(seed=3)
    a = losses.itc_loss(img, txt, temp)
    b = losses.itc_loss(img, txt, temp, image_ids=torch.arange(5))
    assert torch.allclose(a.loss, b.loss, atol=1e-6)


def test_itc_lavis_mode_detaches_gathered_side():
    """gather_with_grad=False: like LAVIS's concat_all_gather, the 'all' side has no grad."""
    img, txt, temp = _feats(seed=1)
    out = losses.itc_loss(img, txt, temp, gather_with_grad=False)
    g_img, g_txt = torch.autograd.grad(out.loss, [img, txt])
    # reference: same loss with the gathered copies detached by hand
    sim_i2t = losses.similarity_matrix(img, txt.detach()) / temp
    sim_t2i = losses.similarity_matrix(img.detach(), txt).t() / temp
    t = torch.arange(5)
    ref = (F.cross_entropy(sim_i2t, t, label_smoothing=0.1) + F.cross_entropy(sim_t2i, t, label_smoothing=0.1)) / 2
    r_img, r_txt = torch.autograd.grad(ref, [img, txt])
    assert torch.allclose(out.loss, ref)
    assert torch.allclose(g_img, r_img, atol=1e-6) and torch.allclose(g_txt, r_txt, atol=1e-6)
    # and it differs from the full-gradient default
    full = losses.itc_loss(img, txt, temp)
    f_img, _ = torch.autograd.grad(full.loss, [img, txt])
    assert (f_img - g_img).abs().max() > 1e-4


def test_similarity_matrix_is_max_over_queries():
    img, txt, _ = _feats(b=3, q=5)
    s = losses.similarity_matrix(img, txt[:2])
    assert s.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert torch.isclose(s[i, j], max(img[i, q] @ txt[j] for q in range(5)))


def test_negative_sampling_masks_positives_and_follows_softmax():
    b = 4
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(b, b, generator=g) * 3
    pos = losses.positive_mask(b, b, rank=0)
    counts = torch.zeros(b, b)
    gen = torch.Generator().manual_seed(123)
    for _ in range(4000):
        ni, nt = losses.sample_itm_negatives(sim, sim.t().contiguous(), pos, generator=gen)
        assert not pos[torch.arange(b), ni].any() and not pos[torch.arange(b), nt].any()
        counts[torch.arange(b), ni] += 1
    expected = F.softmax(sim.t().contiguous().masked_fill(pos, -10000), dim=1)
    assert torch.allclose(counts / 4000, expected, atol=0.03)


def test_negative_sampling_is_reproducible_with_generator_and_respects_image_ids():
    sim = torch.randn(6, 6)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    pos = losses.positive_mask(6, 6, rank=0, image_ids=ids, image_ids_all=ids)
    a = losses.sample_itm_negatives(sim, sim, pos, generator=torch.Generator().manual_seed(7))
    b = losses.sample_itm_negatives(sim, sim, pos, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for _ in range(50):
        ni, nt = losses.sample_itm_negatives(sim, sim, pos)
        assert (ids[ni] != ids).all() and (ids[nt] != ids).all()


def test_positive_mask_uses_rank_offset():
    m = losses.positive_mask(2, 6, rank=1)
    assert m.nonzero().tolist() == [[0, 2], [1, 3]]


def test_negative_sampling_single_sample_does_not_crash():
    sim = torch.tensor([[5.0]])
    pos = losses.positive_mask(1, 1, rank=0)
    ni, nt = losses.sample_itm_negatives(sim, sim, pos)
    assert ni.tolist() == [0] and nt.tolist() == [0]


def test_itm_loss_matches_naive_with_grads():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 2, generator=g, requires_grad=True)
    ours = losses.itm_loss(logits)
    labels = [1, 1, 1, 0, 0, 0, 0, 0, 0]
    ref = sum(-(logits[i] - torch.logsumexp(logits[i], 0))[labels[i]] for i in range(9)) / 9
    assert torch.allclose(ours, ref)
    assert torch.allclose(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0], atol=1e-7)
    with pytest.raises(ValueError, match="3B"):
        losses.itm_loss(torch.randn(4, 2))


def test_itg_matches_lavis_style_full_logits_with_grads():
    """Ours: logits only at positions with a target. Reference: LAVIS's shift over the full
    (B, L, V) logits with ignore_index=-100 and label smoothing 0.1."""
    g = torch.Generator().manual_seed(4)
    b, length, v = 3, 7, 11
    ids = torch.randint(5, v, (b, length), generator=g)
    ids[:, 0] = 2  # [CLS]
    ids[1, 4:] = 0  # padding
    ids[2, 6:] = 0
    dec, labels = losses.decoder_labels(ids, bos_token_id=9, pad_token_id=0)
    assert (dec[:, 0] == 9).all() and labels[1, 4:].eq(-100).all() and labels[0, 0] == 9
    logits_full = torch.randn(b, length, v, generator=g, requires_grad=True)
    ref = F.cross_entropy(
        logits_full[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=0.1
    )
    positions, targets = losses.next_token_targets(labels)
    ours = losses.itg_loss(logits_full[:, :-1][positions], targets)
    assert targets.numel() == (length - 1) + 3 + 5
    assert torch.allclose(ours, ref, atol=1e-6)
    g1 = torch.autograd.grad(ours, logits_full)[0]
    g2 = torch.autograd.grad(ref, logits_full)[0]
    assert torch.allclose(g1, g2, atol=1e-7)
    # hand check of the smoothing formula on one position
    z = logits_full[0, 0]
    logp = z - torch.logsumexp(z, 0)
    manual = -(0.9 * logp[labels[0, 1]] + 0.1 * logp.mean())
    one = losses.itg_loss(z[None], labels[0, 1:2])
    assert torch.allclose(one, manual, atol=1e-6)
