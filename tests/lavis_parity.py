"""Compare qformer with a dump of the original LAVIS 1.0.2 code (../shared/tools/lavis-oracle).

``stage1_parity(oracle_dir)`` loads LAVIS's Blip2Qformer state dict into qformer, replays the
oracle's batch with the same ITM negatives, and returns the max |diff| of every quantity the
oracle recorded (losses, features, similarities, ITM and LM logits, gradients).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qformer import Blip2, Blip2Config, QFormerConfig, Stage1Objective
from qformer.persistence import lavis_eva_vision_config


def oracle_config(oracle_dir: Path) -> Blip2Config:
    cfg = json.loads((oracle_dir / "config.json").read_text())["cfg"]
    bert = cfg["qformer_bert"]
    return Blip2Config(
        vision=lavis_eva_vision_config(cfg["vit"]),
        qformer=QFormerConfig(
            vocab_size=cfg["bert_vocab_with_dec"],
            hidden_size=bert["hidden_size"],
            num_layers=bert["num_hidden_layers"],
            num_heads=bert["num_attention_heads"],
            intermediate_size=bert["intermediate_size"],
            hidden_act=bert["hidden_act"],
            hidden_dropout=bert["hidden_dropout_prob"],
            attention_dropout=bert["attention_probs_dropout_prob"],
            max_position_embeddings=bert["max_position_embeddings"],
            layer_norm_eps=bert["layer_norm_eps"],
            pad_token_id=bert["pad_token_id"],
            cross_attention_freq=cfg["cross_attention_freq"],
            encoder_width=cfg["vit"]["embed_dim"],
            num_query_tokens=cfg["num_query_token"],
        ),
        embed_dim=cfg["embed_dim"],
        max_txt_len=cfg["max_txt_len"],
        ln_vision_eps=1e-5,
        dec_token_id=cfg["bert_vocab_with_dec"] - 1,
    )


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def stage1_parity(oracle_dir: Path, *, padding: str = "max_length") -> dict[str, float]:
    """Max |ours - LAVIS| per recorded quantity (and exact-equality checks as 0/inf)."""
    oracle_dir = Path(oracle_dir)
    ref = _load(oracle_dir / "blip2_qformer_outputs.pt")
    inputs = _load(oracle_dir / "inputs.pt")
    model, report = Blip2.from_pretrained(
        oracle_dir / "blip2_qformer_state_dict.pt",
        config=oracle_config(oracle_dir),
        tokenizer=oracle_dir / "bert_tokenizer",
        return_report=True,
    )
    assert report.ok, str(report)
    model.eval()
    tok = model.tokenizer(
        inputs["captions"], padding=padding, truncation=True, max_length=model.config.max_txt_len, return_tensors="pt"
    )
    ids, mask = tok["input_ids"], tok["attention_mask"]
    length = ids.shape[1]
    diffs: dict[str, float] = {}

    def d(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
        diffs[name] = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0

    diffs["text_input_ids (exact)"] = 0.0 if torch.equal(ids, ref["text_input_ids"][:, :length]) else float("inf")
    objective = Stage1Objective(model, gather_with_grad=False)  # LAVIS gathers without grad
    model.zero_grad()
    out = objective(
        pixel_values=inputs["image"],
        input_ids=ids,
        attention_mask=mask,
        negatives=(ref["neg_image_idx_for_text"], ref["neg_text_idx_for_image"]),
        rank=0,
        world_size=1,
    )
    out.loss.backward()
    f = out.features
    for name, ours in [
        ("loss", out.loss), ("loss_itc", out.loss_itc), ("loss_itm", out.loss_itm), ("loss_lm", out.loss_itg),
        ("image_embeds", f.image.image_embeds), ("query_output_last_hidden_state", f.image.query_output),
        ("image_feats", f.image_feats), ("text_feat", f.text_feats), ("sim_i2t", out.sim_i2t),
        ("sim_t2i", out.sim_t2i), ("itm_logits_all", out.itm_logits),
    ]:
        d(name, ours, ref[name])
    real = mask.bool()
    # The objective's text pass computes only [CLS] in its last layer; the full encoder all rows.
    d("text_output_last_hidden_state[CLS]", f.text_hidden[:, 0], ref["text_output_last_hidden_state"][:, 0])
    with torch.no_grad():
        full = model.encode_text(ids, mask)
    d("text_output_last_hidden_state", full[real], ref["text_output_last_hidden_state"][:, :length][real])
    d("vit_out", model.vision(inputs["image"]), ref["vit_out"])
    # LM logits at the positions that predict a real token (ours computes only those)
    from qformer import losses

    _, labels = losses.decoder_labels(ids, bos_token_id=model.config.dec_token_id, pad_token_id=0)
    positions, _ = losses.next_token_targets(labels)
    with torch.no_grad():
        dec_ids, _ = losses.decoder_labels(ids, bos_token_id=model.config.dec_token_id, pad_token_id=0)
        hidden = model.decode_text(dec_ids, mask, f.image.query_kv)
        d("lm_logits", model.qformer.lm_logits(hidden[:, :-1][positions]), ref["lm_logits"][:, : length - 1][positions])
    for name, grad in ref["grads"].items():
        d("grad." + name, dict(model.named_parameters())[name].grad, grad)
    return diffs
