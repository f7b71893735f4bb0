"""Stage 2: the Q-Former's query outputs, projected, as soft visual prompts of a frozen LLM.

* :class:`Stage2TextCollator` tokenises captions for the LLM (in the data pipeline, never in
  ``forward``): BLIP-2's label rules for causal LMs, prompt -> caption or the prefix-LM
  split for seq2seq LMs.
* :class:`Stage2Objective` is one training step (wrap it in DDP / accelerate).

Generation from the same soft prompts is :mod:`qformer.generation`.

Decoder-only layout (OPT; any causal LM)::

    inputs_embeds = [proj(query_output) (Q) ; embed(BOS prompt caption "\\n" pad...)]
    labels        = [-100 x Q            ; -100 on BOS+prompt and pad, caption tokens]

Encoder-decoder layout (T5)::

    encoder: [proj(query_output) ; embed(prefix or prompt </s>)]     decoder target: suffix/caption </s>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, LLMConfig
from .llm import causal_logits_at, end_of_text_ids, input_embeddings, is_encoder_decoder
from .model import Blip2Model
from .tokenizer import instruction_tokens

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase


def split_prefix_lm(caption: str, generator: torch.Generator | None = None) -> tuple[str, str]:
    """BLIP-2's prefix-LM split: a random word boundary k in [0, n-1] sends words[:k] to the
    encoder and words[k:] (never empty) to the decoder. One-word captions give ("", word)."""
    words = caption.split()
    if not words:
        return "", ""
    k = int(torch.randint(0, len(words), (1,), generator=generator))
    return " ".join(words[:k]), " ".join(words[k:])


def _join(prompt: str, text: str) -> str:
    if not prompt:
        return text
    return prompt + text if prompt.endswith((" ", "\n")) else prompt + " " + text


class Stage2TextCollator:
    """Captions (or answers) -> LLM tensors for :class:`Stage2Objective`.

    Causal LMs: ``input_ids``, ``attention_mask`` (right padded, BOS from the tokenizer) and
    ``labels`` (-100 on the prompt incl. BOS, and on padding). Seq2seq LMs:
    ``input_ids`` / ``attention_mask`` for the encoder, ``labels`` (-100 on padding) and
    ``decoder_attention_mask`` for the decoder.

    Each row's prompt is ``config.prompt`` unless ``prompts=`` gives one per row (instruction
    tuning: the instruction is the prompt, the answer the target). With ``qformer_tokenizer``
    (an instruction-aware model, InstructBLIP) the prompts are also tokenised for the Q-Former:
    ``qformer_input_ids`` / ``qformer_attention_mask`` (truncated on the left to
    ``qformer_max_length``, as LAVIS, so a long instruction keeps its question).
    """

    def __init__(
        self,
        tokenizer: "PreTrainedTokenizerBase",
        config: LLMConfig,
        *,
        encoder_decoder: bool,
        generator: torch.Generator | None = None,
        qformer_tokenizer: "PreTrainedTokenizerBase | None" = None,
        qformer_max_length: int = 128,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.encoder_decoder = encoder_decoder
        self.generator = generator
        self.qformer_tokenizer = qformer_tokenizer
        self.qformer_max_length = int(qformer_max_length)
        if config.text_mode == "prefix_lm" and not encoder_decoder:
            raise ConfigError("llm.text_mode='prefix_lm' needs an encoder-decoder LLM (T5); causal LMs use 'prompt'")
        if tokenizer.pad_token_id is None:
            raise ConfigError("the LLM tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
        if not encoder_decoder:
            end_of_text_ids(tokenizer, config)  # a caption must end in a token generation can stop at
            self.eot = config.end_of_text if config.end_of_text is not None else tokenizer.eos_token
        if qformer_tokenizer is not None and config.text_mode == "prefix_lm":
            raise ConfigError("an instruction-aware model trains on prompts (llm.text_mode='prompt'), not the prefix-LM split")

    def _tok(self, texts: list[str]):
        return self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.config.max_txt_len, return_tensors="pt"
        )

    def _instruction_rows(self, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        """Causal rows for per-row instructions: ``prompt answer eot`` tokenised as one text (so
        the tokens are those generation continues from), then fitted to ``max_txt_len`` by
        cutting the instruction from the left (keeping the tokenizer's leading special token,
        as LAVIS truncates InstructBLIP's input) and only then the answer from the right: every
        row keeps a target."""
        tok, limit = self.tokenizer, self.config.max_txt_len
        lead = len(tok("").input_ids)  # BOS (OPT, LLaMA) or nothing (GPT-2, Qwen)
        rows, label_rows = [], []
        for prompt, answer in zip(prompts, answers):
            ids = tok(_join(prompt, answer) + self.eot).input_ids
            n_prompt = self._prompt_length(prompt) if prompt else lead
            head, body, tail = ids[:lead], ids[lead:n_prompt], ids[n_prompt:]
            tail = tail[: max(1, limit - lead)]
            keep = max(0, limit - lead - len(tail))  # the instruction's last `keep` tokens
            body = body[max(0, len(body) - keep):]
            rows.append(head + body + tail)
            label_rows.append([-100] * (len(head) + len(body)) + tail)
        longest = max(len(r) for r in rows)
        pad = tok.pad_token_id
        input_ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
        labels = torch.tensor([r + [-100] * (longest - len(r)) for r in label_rows])
        return dict(input_ids=input_ids, attention_mask=mask, labels=labels)

    def _prompt_length(self, prompt: str) -> int:
        """The prompt's length in tokens, BOS included (as LAVIS counts it)."""
        return len(self.tokenizer(prompt).input_ids) if prompt else 0

    def qformer_tokens(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The instructions in the Q-Former's tokens (padding longest, truncated on the left)."""
        return instruction_tokens(self.qformer_tokenizer, list(prompts), max_length=self.qformer_max_length)

    def __call__(
        self,
        captions: Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        prompts: Sequence[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``seeds``: one per caption, for the prefix-LM split (reproducible in any worker and
        after a resume); without them the collator's own generator is used. ``prompts``: one
        per caption (None: ``config.prompt``)."""
        captions = list(captions)
        if prompts is None:
            row_prompts = [self.config.prompt] * len(captions)
        else:
            if len(prompts) != len(captions):
                raise ValueError(f"{len(prompts)} prompts for {len(captions)} captions")
            row_prompts = [self.config.prompt if p is None else p for p in prompts]
        extra = self.qformer_tokens(row_prompts) if self.qformer_tokenizer is not None else {}
        return {**self._llm_rows(captions, row_prompts, seeds=seeds, per_row=prompts is not None), **extra}

    def weighted(
        self,
        answers: Sequence[Sequence[tuple[str, float]]],
        *,
        prompts: Sequence[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """VQA fine-tuning's weighted multi-answer rows: question i with answers ``[(text, weight),
        ...]`` gives one LLM row per answer (its prompt the question's), in order, plus
        ``answer_rows`` (R,) (the question, i.e. the image, of each row) and ``answer_weights``
        (R,) for :class:`Stage2Objective`; the Q-Former's instruction tokens stay one row per
        question (B), since the Q-Former reads each question once."""
        answers = [list(a) for a in answers]
        if not answers or any(not a for a in answers):
            raise ValueError("weighted answers need at least one (answer, weight) per question")
        if prompts is not None and len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts for {len(answers)} questions")
        questions = [self.config.prompt if prompts is None or p is None else p for p in (prompts or [None] * len(answers))]
        rows = [i for i, a in enumerate(answers) for _ in a]
        out = self._llm_rows([t for a in answers for t, _ in a], [questions[i] for i in rows], seeds=None, per_row=True)
        if self.qformer_tokenizer is not None:
            out.update(self.qformer_tokens(questions))
        out["answer_rows"] = torch.tensor(rows, dtype=torch.long)
        out["answer_weights"] = torch.tensor([float(w) for a in answers for _, w in a], dtype=torch.float32)
        return out

    def _llm_rows(self, captions: list[str], row_prompts: list[str], *, seeds: Sequence[int] | None,
                  per_row: bool) -> dict[str, torch.Tensor]:
        """The LLM's tensors of (prompt, caption) rows; ``per_row``: the prompts are instructions
        (not the card's one prompt): causal rows keep each answer whole, seq2seq rows skip the
        prefix-LM split and truncate the instruction on the left."""
        prompts = row_prompts if per_row else None
        if not self.encoder_decoder and prompts is not None:
            return self._instruction_rows(row_prompts, captions)
        if not self.encoder_decoder:
            old = self.tokenizer.padding_side
            self.tokenizer.padding_side = "right"
            try:
                tok = self._tok([_join(p, c) + self.eot for p, c in zip(row_prompts, captions)])
            finally:
                self.tokenizer.padding_side = old
            labels = tok.input_ids.masked_fill(tok.attention_mask == 0, -100)
            lengths = {p: self._prompt_length(p) for p in set(row_prompts)}
            for i, p in enumerate(row_prompts):
                labels[i, : lengths[p]] = -100
            return dict(input_ids=tok.input_ids, attention_mask=tok.attention_mask, labels=labels)
        if self.config.text_mode == "prefix_lm" and prompts is None:
            gens = [torch.Generator().manual_seed(int(x)) for x in seeds] if seeds is not None else [self.generator] * len(captions)
            pairs = [split_prefix_lm(c, g) for c, g in zip(captions, gens)]
        else:
            pairs = list(zip(row_prompts, captions))
        old_side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left" if prompts is not None else old_side  # an instruction keeps its end
        try:
            enc = self._tok([p for p, _ in pairs])
        finally:
            self.tokenizer.truncation_side = old_side
        dec = self._tok([t for _, t in pairs])
        labels = dec.input_ids.masked_fill(dec.attention_mask == 0, -100)
        return dict(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            labels=labels,
            decoder_attention_mask=dec.attention_mask,
        )


@dataclass
class Stage2Output:
    loss: torch.Tensor
    logits: torch.Tensor  # causal: (N, V) at labelled positions only; seq2seq: (B, T, V)
    targets: torch.Tensor  # causal: (N,) the labels those logits predict; seq2seq: labels (B, T)

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss.item()}


class Stage2Objective(nn.Module):
    """``forward(batch) -> Stage2Output``: next-token CE of the frozen LLM on the captions,
    conditioned on the projected query outputs. Batches come from :class:`Stage2TextCollator`
    plus ``pixel_values`` (or ``vision_features`` / ``image_embeds``).

    With ``answer_rows`` / ``answer_weights`` (VQA fine-tuning, :meth:`Stage2TextCollator.weighted`)
    the loss is BLIP's weighted multi-answer loss: each LLM row r is one distinct answer a of
    question q(r), its loss the sum of its target tokens' negative log-likelihoods (the
    end-of-text token included), and

        loss = (1 / B) * sum_r  w_r * NLL(a_r | image, q(r))

    with B the number of questions (images) and w_r the answer's share of the question's human
    answers (a question's weights sum to 1): a mean over questions of each question's expected
    answer loss. The image, tower and Q-Former run once per question; the soft prompts are
    repeated for its answers."""

    def __init__(self, model: Blip2Model) -> None:
        super().__init__()
        if model.config.llm is None:
            raise ConfigError("Stage2Objective needs a model with an LLM (config.llm)")
        self.model = model

    def after_optimizer_step(self, step: int) -> None:
        """The loop's hook after each optimizer step: nothing to do in stage 2."""

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        answer_rows: torch.Tensor | None = None,  # (R,) the question of each LLM row (weighted answers)
        answer_weights: torch.Tensor | None = None,  # (R,) each row's answer weight
        image_ids: torch.Tensor | None = None,  # accepted (and unused) so stage-1 batches fit
        step: int | None = None,  # accepted (and unused): the loop passes every objective its step
        generator: torch.Generator | None = None,  # accepted (and unused): no random draw in stage 2
    ) -> Stage2Output:
        """Images: ``pixel_values`` (B, 3, H, W) / ``vision_features`` (B, N, C) /
        ``image_embeds``. Video clips: ``pixel_values`` (B, T, 3, H, W) or ``vision_features``
        (B, T, N, C), every clip of the batch T frames. ``qformer_input_ids`` /
        ``qformer_attention_mask``: the instruction for an instruction-aware Q-Former."""
        model = self.model
        frames = 1
        if pixel_values is not None and pixel_values.dim() == 5:  # (B, T, 3, H, W) clips
            frames, pixel_values = pixel_values.shape[1], pixel_values.flatten(0, 1)
        if vision_features is not None and vision_features.dim() == 4:  # (B, T, N, C) clips
            frames, vision_features = vision_features.shape[1], vision_features.flatten(0, 1)
        if image_embeds is None:
            image_embeds = model.embed_image(pixel_values, vision_features=vision_features)
        prompts = model.soft_prompts(image_embeds, instruction_ids=qformer_input_ids,
                                     instruction_mask=qformer_attention_mask, frames=frames)  # (B, T*Q, H)
        weighted = answer_rows is not None
        if weighted != (answer_weights is not None):
            raise ValueError("answer_rows and answer_weights come together (Stage2TextCollator.weighted)")
        questions = prompts.shape[0]
        if weighted:
            prompts = prompts[answer_rows]  # (R, T*Q, H): each answer row gets its question's soft prompts
        b, q = prompts.shape[:2]
        text = input_embeddings(model.llm, input_ids)  # (B, L, H)
        embeds = torch.cat([prompts.to(text.dtype), text], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, q), attention_mask], dim=1)
        if is_encoder_decoder(model.llm):
            out = model.llm(
                inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_attention_mask
            )
            if not weighted:
                return Stage2Output(loss=out.loss, logits=out.logits, targets=labels)
            nll = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                  reduction="none").view_as(labels).sum(1)  # (R,)
            return Stage2Output(loss=_weighted_mean(nll, answer_weights, questions), logits=out.logits, targets=labels)
        full = torch.cat([labels.new_full((b, q), -100), labels], dim=1)  # (B, Q+L)
        nxt = full[:, 1:]
        positions = F.pad(nxt != -100, (0, 1), value=False)  # position t predicts full[t+1]
        logits = causal_logits_at(model.llm, embeds, mask, positions)  # (N, V)
        targets = nxt[nxt != -100]
        if not weighted:
            return Stage2Output(loss=F.cross_entropy(logits.float(), targets), logits=logits, targets=targets)
        token_nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
        row_of = positions.nonzero(as_tuple=True)[0]  # (N,) the row of each target, in the same order
        nll = token_nll.new_zeros(b).index_add(0, row_of, token_nll)  # (R,) per answer row
        return Stage2Output(loss=_weighted_mean(nll, answer_weights, questions), logits=logits, targets=targets)


def _weighted_mean(nll: torch.Tensor, weights: torch.Tensor, questions: int) -> torch.Tensor:
    """sum_r w_r * nll_r / questions (see :class:`Stage2Objective`)."""
    return (weights.to(nll) * nll).sum() / questions


__all__ = ["Stage2Objective", "Stage2Output", "Stage2TextCollator", "split_prefix_lm"]
