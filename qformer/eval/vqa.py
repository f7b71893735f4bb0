"""VQA metrics: VQAv2 accuracy (the official evaluation, answer normalisation included),
exact-match accuracy for single-answer data (GQA-style), and BLIP-2's zero-shot VQA settings.

The normalisation is a line-by-line port of the official ``vqaEval.py`` (GT-Vision-Lab/VQA,
``PythonEvaluationTools``), quirks included, because every published VQAv2 number went through
it:

* punctuation: each mark in :data:`PUNCTUATION` is deleted when it touches a space (or when
  the answer contains a digit-comma-digit such as ``1,000``), otherwise replaced by a space;
  periods are removed unless followed by a digit (``3.5`` keeps its point);
* lower-case, number words ``none``/``zero``..``ten`` -> digits, articles ``a/an/the`` dropped,
  apostrophe-less contractions restored (``dont`` -> ``don't``) from :data:`CONTRACTIONS`.

**Which answers get normalised** differs between the two published versions of the script,
so it is a parameter (``protocol``):

* ``"official"`` (the current official script, after its 2021 "fixed processing answers" fix):
  when the human answers of a question are *not* unanimous, the prediction and every human
  answer are fully normalised; when all humans gave the same string, nothing is normalised
  (only ``strip``), so the prediction must match it exactly.
* ``"lavis"`` (LAVIS's copy, the pre-fix script that produced BLIP-2's reported numbers): the
  prediction is always fully normalised; human answers get only the punctuation step, and
  only when they are not unanimous.

The accuracy of one question is the official leave-one-out average: for each of the n human
answers, ``min(1, #matches among the other n-1 / 3)``, averaged over the n subsets. With 10
answers and m matches this is ``min(m/3, 1)`` except for m = 1, 2, 3 (0.3, 0.6, 0.9 instead
of 1/3, 2/3, 1).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Hashable, Literal, Mapping, Sequence

#: BLIP-2's zero-shot VQA prompts (paper, section 4.2; LAVIS configs).
VQA_PROMPT_OPT = "Question: {} Answer:"
VQA_PROMPT_T5 = "Question: {} Short answer:"

Protocol = Literal["official", "lavis"]


@dataclass(frozen=True)
class VQADecodeSettings:
    """BLIP-2's zero-shot VQA decoding (LAVIS ``predict_answers``): beam search, short answers.

    ``length_penalty=-1`` divides beam scores by length**-1, i.e. favours *shorter* answers,
    which is what VQA wants (one or two words). ``min_new_tokens=1`` is LAVIS's ``min_len``.
    """

    num_beams: int = 5
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    length_penalty: float = -1.0
    do_sample: bool = False

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``transformers``' ``generate``."""
        return asdict(self)


def vqa_prompt(question: str, llm: Literal["opt", "t5"] | str = "opt") -> str:
    """The zero-shot prompt for ``question``: decoder-only LLMs (OPT and other causal LMs) get
    :data:`VQA_PROMPT_OPT`, encoder-decoders (FlanT5) :data:`VQA_PROMPT_T5`."""
    template = VQA_PROMPT_T5 if str(llm).lower() in ("t5", "flant5", "flan-t5", "encoder-decoder") else VQA_PROMPT_OPT
    return template.format(question.strip())


# ---------------------------------------------------------------------------- normalisation
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # verbatim from the official script (its odd entries, e.g. "somebody'd" -> "somebodyd", included)
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# The official pattern, kept verbatim: "(?!<=\d)" is a malformed look-behind that, as a
# look-ahead, is always true at a period, so this strips every period not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` (see the module docstring)."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (32) positionally, i.e. as ``count``: at most 32
    # periods are removed. Kept for exactness (no real answer has more).
    return _PERIOD_STRIP.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, drop articles,
    restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return str(text).replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """Full official normalisation of one answer: whitespace, punctuation, digits/articles/
    contractions (``"Two dogs."`` -> ``"2 dogs"``)."""
    return process_digit_article(process_punctuation(_clean(answer)))


# ---------------------------------------------------------------------------- accuracy
def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    # By position, not by value: the official script drops one answer *record* per subset
    # (its dicts carry a unique answer_id), so identical strings are distinct humans.
    matches = [a == prediction for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str], *, protocol: Protocol = "official") -> float:
    """VQA accuracy of one prediction against the human answers (usually 10), in [0, 1]."""
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one human answer")
    if protocol not in ("official", "lavis"):
        raise ValueError(f"protocol must be 'official' or 'lavis', got {protocol!r}")
    pred = _clean(prediction)
    if protocol == "official":
        gts = [_clean(a) for a in answers]
        if len(set(gts)) > 1:
            gts = [normalize_answer(a) for a in gts]
            pred = normalize_answer(pred)
    else:  # LAVIS's copy does not even strip the human answers
        gts = [str(a) for a in answers]
        pred = process_digit_article(process_punctuation(pred))
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    return _leave_one_out(pred, gts)


def vqa_accuracy_simple(prediction: str, answers: Sequence[str]) -> float:
    """The commonly quoted shortcut ``min(#matching humans / 3, 1)`` (after normalising both
    sides). Equal to :func:`vqa_accuracy` for 0 or >= 4 matches of 10, higher for 1-3."""
    pred = normalize_answer(prediction)
    return min(1.0, sum(normalize_answer(a) == pred for a in answers) / 3.0)


def vqa_score(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, Sequence[str]],
    *,
    answer_types: Mapping[Hashable, str] | None = None,
    protocol: Protocol = "official",
) -> dict[str, float | int]:
    """VQAv2 accuracy (percent, as the leaderboard prints it) over ``predictions``.

    Args:
        predictions: {question_id: predicted answer}.
        answers: {question_id: the human answers (10 for VQAv2 / OK-VQA)}.
        answer_types: optional {question_id: "yes/no" | "number" | "other"}; adds
            ``accuracy/<type>`` entries.
        protocol: ``"official"`` or ``"lavis"`` (module docstring).

    Returns ``{"accuracy": ..., "accuracy/<type>": ..., "num_questions": n}``. Every prediction
    must have answers; questions without a prediction are not scored (make sure that is what
    you want: the leaderboard counts them as wrong).
    """
    if not predictions:
        raise ValueError("vqa_score needs at least one prediction")
    missing = [q for q in predictions if q not in answers]
    if missing:
        raise ValueError(f"{len(missing)} predictions have no human answers, e.g. {missing[:5]}")
    per_type: dict[str, list[float]] = {}
    accs = []
    for q, pred in predictions.items():
        acc = vqa_accuracy(pred, answers[q], protocol=protocol)
        accs.append(acc)
        if answer_types is not None and q in answer_types:
            per_type.setdefault(answer_types[q], []).append(acc)
    out = {"accuracy": 100.0 * sum(accs) / len(accs)}
    for t, vals in sorted(per_type.items()):
        out[f"accuracy/{t}"] = 100.0 * sum(vals) / len(vals)
    out["num_questions"] = len(accs)
    return out


def exact_match_accuracy(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, str | Sequence[str]],
    *,
    normalize: bool = True,
) -> dict[str, float | int]:
    """Exact-match accuracy (percent) for single-answer data such as GQA.

    Both sides go through :func:`normalize_answer` (LAVIS's GQA task normalises only the
    prediction; GQA's answers are already in that form, so the two agree there, and
    normalising both also makes ``"none"`` match ``"0"`` consistently). A sequence of answers
    counts a hit if any matches. OK-VQA, with its 10 (5 x 2) human answers, is normally scored
    with :func:`vqa_score` instead.
    """
    if not predictions:
        raise ValueError("exact_match_accuracy needs at least one prediction")
    norm = normalize_answer if normalize else _clean
    hits = 0
    for q, pred in predictions.items():
        if q not in answers:
            raise ValueError(f"prediction for {q!r} has no answer")
        gt = answers[q]
        options = [gt] if isinstance(gt, str) else list(gt)
        p = norm(pred)
        hits += any(norm(a) == p for a in options)
    return {"accuracy": 100.0 * hits / len(predictions), "num_questions": len(predictions)}


__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "VQADecodeSettings",
    "VQA_PROMPT_OPT",
    "VQA_PROMPT_T5",
    "exact_match_accuracy",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
    "vqa_accuracy_simple",
    "vqa_prompt",
    "vqa_score",
]
