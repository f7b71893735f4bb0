"""COCO caption metrics for any image-caption data: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), SPICE.

The numbers are pycocoevalcap's (the COCO caption server's code, which LAVIS and the BLIP-2
paper report): the same tokenisation, the same scorers, the same scale (fractions: CIDEr of a
strong COCO captioner is about 1.4, the papers print it x100).

Java is optional. pycocoevalcap needs it in three places, and each degrades separately:

* **Tokenisation** (Stanford PTBTokenizer, a jar shipped with pycocoevalcap). Without Java a
  pure-Python re-implementation (:func:`python_ptb_tokenize`) is used instead, with a notice.
  It reproduces the jar's output on ordinary caption text (lower-casing, punctuation split
  and then removed, ``n't``/``'s``/``'re``... clitics split, ``-lrb-`` style bracket escapes,
  hyphenated words, decimals, ``1,000`` and abbreviations such as ``u.s.`` kept whole); it
  differs on rare constructs (sentence-final abbreviations, which the jar doubles as
  ``etc. .``, unusual symbols, URLs). ``tests/test_eval.py`` compares the two when Java is
  present.
* **METEOR** (a jar run as a subprocess): skipped without Java.
* **SPICE** (a jar plus Stanford CoreNLP 3.6.0, which pycocoevalcap *downloads* on first use):
  skipped without Java, and also skipped when the CoreNLP jars are not already on disk; we
  never trigger that download (these machines have no network, and a half-finished download
  would leave a broken install behind).

Nothing here raises because Java is missing or a Java scorer fails: the metric is reported in
:attr:`CaptionScores.skipped` with the reason and the others are still computed.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Hashable, Iterable, Literal, Mapping, Sequence

logger = logging.getLogger(__name__)

#: metric group -> the result keys it produces (pycocoevalcap's names).
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE_L",),
    "cider": ("CIDEr",),
    "spice": ("SPICE",),
}
DEFAULT_METRICS: tuple[str, ...] = ("bleu", "cider", "rouge", "meteor", "spice")

#: Tokens pycocoevalcap's PTBTokenizer drops after tokenising (copied so that the fallback
#: does not depend on importing pycocoevalcap). Note the upper-case bracket escapes never
#: match: the jar runs with ``-lowerCase``, which lower-cases ``-LRB-`` to ``-lrb-`` too, so
#: bracket tokens survive into the scored text. We reproduce that.
PTB_PUNCTUATIONS: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

TokenizerChoice = Literal["auto", "ptb", "python"]


class CaptionScores(dict):
    """``dict[str, float]`` of metric name -> corpus score, plus what could not be computed.

    A plain dict subclass so that it serialises with ``json`` and compares like a dict; the
    extra attributes say how the numbers were obtained.

    Attributes:
        skipped: metric group (``"meteor"``, ``"spice"``, ...) -> why it was not computed.
        notices: human-readable notes (tokeniser fallback, missing predictions, ...).
        tokenizer: ``"ptb"`` (Stanford PTBTokenizer through Java) or ``"python"`` (fallback).
        per_image: metric name -> {id: score} for the metrics that give per-image scores.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}
        self.notices: list[str] = []
        self.tokenizer: str = ""
        self.per_image: dict[str, dict[Hashable, float]] = {}

    def metadata(self) -> dict:
        """What :mod:`qformer.eval.report` writes next to the numbers."""
        return {"skipped": dict(self.skipped), "notices": list(self.notices), "tokenizer": self.tokenizer}


# ---------------------------------------------------------------------------- environment
def _pycocoevalcap_dir() -> Path | None:
    try:
        import pycocoevalcap
    except ImportError:
        return None
    paths = list(getattr(pycocoevalcap, "__path__", []))  # a namespace package: no __file__
    return Path(paths[0]) if paths else None


@functools.lru_cache(maxsize=8)
def _java_runs(java: str) -> bool:
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def java_available() -> bool:
    """Whether a working ``java`` is on ``PATH`` (the scorers run plain ``java``).

    The lookup follows ``PATH`` at call time (so hiding Java from a test works); whether a
    given binary actually runs is cached per path, since starting a JVM costs a fraction of
    a second.
    """
    java = shutil.which("java")
    return java is not None and _java_runs(java)


def spice_models_missing() -> list[Path]:
    """The Stanford CoreNLP jars SPICE needs but that are not on disk (pycocoevalcap's
    ``get_stanford_models`` would download them)."""
    root = _pycocoevalcap_dir()
    if root is None:
        return [Path("pycocoevalcap")]
    lib = root / "spice" / "lib"
    jars = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    return [p for p in jars if not p.exists()]


# ---------------------------------------------------------------------------- tokenisation
def _clean_line(text: str) -> str:
    """One caption on one line: PTBTokenizer runs with ``-preserveLines`` over a file with one
    caption per line, so any line break inside a caption would shift every later caption."""
    return " ".join(str(text).split())


# Clitics and multi-word contractions split by the PTB lexer (the list NLTK's Treebank
# tokenizer also takes from the Penn Treebank sed script).
_MULTIWORD = [
    (re.compile(r"^(can)(not)$"), r"\1 \2"),
    (re.compile(r"^(d)('ye)$"), r"\1 \2"),
    (re.compile(r"^(gim)(me)$"), r"\1 \2"),
    (re.compile(r"^(gon)(na)$"), r"\1 \2"),
    (re.compile(r"^(got)(ta)$"), r"\1 \2"),
    (re.compile(r"^(lem)(me)$"), r"\1 \2"),
    (re.compile(r"^(mor)('n)$"), r"\1 \2"),
    (re.compile(r"^(wan)(na)$"), r"\1 \2"),
    (re.compile(r"^('t)(is|was)$"), r"\1 \2"),
    (re.compile(r"^(y')(all)$"), r"\1 \2"),
]
_NT = re.compile(r"^(.*[a-z])(n't)$", re.IGNORECASE)
_CLITIC = re.compile(r"^(.*[a-z0-9])('s|'re|'ll|'d|'ve|'m)$", re.IGNORECASE)
#: Tokens ending in "." that the PTB lexer keeps whole (lower-cased; the jar's list is longer).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc inc ltd co corp no jan feb mar apr jun jul aug sep sept oct nov dec "
    "mt ft ave blvd rd gen col lt sgt capt gov rep sen rev messrs".split()
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def _split_period(token: str) -> list[str]:
    if len(token) < 2 or not token.endswith(".") or token.endswith(".."):
        return [token]
    stem = token[:-1]
    # u.s. / p.m. / e.g. (an inner period), known abbreviations and initials ("A. Lincoln")
    # stay whole.
    if "." in stem or stem.lower() in _ABBREVIATIONS or re.fullmatch(r"[A-Z]", stem):
        return [token]
    return [stem, "."]


def _split_apostrophes(token: str) -> list[str]:
    lower = token.lower()
    for pattern, repl in _MULTIWORD:
        if pattern.match(lower):
            return pattern.sub(repl, lower).split()
    if "'" not in token or lower == "'n'":
        return [token]
    out: list[str] = []
    # Opening single quote (a quotation mark), except the '90s / 'n' kind of contraction.
    while token.startswith("'") and len(token) > 1 and not re.match(r"^'\d+s?$|^'(em|n|cause|til)$", token):
        out.append("`")
        token = token[1:]
    tail: list[str] = []
    # Closing quote or plural possessive (dogs').
    while token.endswith("'") and len(token) > 1:
        tail.insert(0, "'")
        token = token[:-1]
    m = _NT.match(token)
    if m:
        out += [m.group(1), m.group(2)]
    else:
        m = _CLITIC.match(token)
        if m:
            out += [m.group(1), m.group(2)]
        else:
            out.append(token)
    return out + tail


def python_ptb_tokenize(text: str) -> str:
    """Pure-Python stand-in for pycocoevalcap's ``PTBTokenizer`` on one caption.

    Same contract as the Java path: lower-case, PTB-tokenise, drop the tokens in
    :data:`PTB_PUNCTUATIONS`, join with single spaces. See the module docstring for where it
    can differ from the jar.
    """
    s = _clean_line(text)
    # Unicode quotes and dashes as the PTB lexer normalises them.
    s = s.replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "'").replace("\u2019", "'")
    s = s.replace("\u2014", " -- ").replace("\u2013", " -- ").replace("\u2026", " ... ")
    s = re.sub(r"\.\.\.+", " ... ", s)
    s = re.sub(r"--+", " -- ", s)
    s = s.replace('"', " '' ").replace("`", " ` ")
    for bracket, escape in _BRACKETS.items():
        s = s.replace(bracket, f" {escape} ")
    s = re.sub(r"([?!]+|[;%$*])", r" \1 ", s)  # "?!" is one token (and survives the filter)
    s = re.sub(r"(?<!\d):|:(?!\d)", " : ", s)  # 2:30 stays whole
    s = re.sub(r"(?<!\d),|,(?!\d)", " , ", s)  # 1,000 stays whole
    s = re.sub(r"#(?=\d)", " # ", s)
    tokens: list[str] = []
    for raw in s.split():
        if raw in ("-", "--", "...", "&"):
            tokens.append(raw)
            continue
        for piece in _split_apostrophes(raw):
            tokens += _split_period(piece)
    # Lower-case last: the period rule looks at the original case (initials).
    return " ".join(t for t in (t.lower() for t in tokens) if t not in PTB_PUNCTUATIONS)


def _java_ptb_tokenize(lines: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer, run exactly as it runs it (same jar, same flags, same
    punctuation filter), but with its temporary file in the system temp dir rather than inside
    site-packages (which may be read-only) and with the line count checked (pycocoevalcap
    would silently misalign captions if the jar dropped or added a line)."""
    root = _pycocoevalcap_dir()
    if root is None:
        raise RuntimeError("pycocoevalcap is not installed")
    jar = root / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if not jar.exists():
        raise RuntimeError(f"{jar} is missing")
    fd, path = tempfile.mkstemp(prefix="qformer-ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write("\n".join(lines).encode())
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        proc = subprocess.run(cmd, capture_output=True, timeout=3600)
    finally:
        os.remove(path)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer exited with {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")
    out = proc.stdout.decode().split("\n")
    if len(out) == len(lines) + 1 and out[-1] == "":
        out = out[:-1]
    if len(out) != len(lines):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in PTB_PUNCTUATIONS) for line in out]


def tokenize_captions(
    captions: Mapping[Hashable, Sequence[str]], *, tokenizer: TokenizerChoice = "auto"
) -> tuple[dict[Hashable, list[str]], str, list[str]]:
    """PTB-tokenise every caption: ``{id: [caption, ...]}`` -> the same shape, tokenised.

    Returns ``(tokenised, backend, notices)`` where ``backend`` is ``"ptb"`` or ``"python"``.
    ``"auto"`` and ``"ptb"`` use the Java tokenizer when Java works and fall back (with a
    notice) otherwise; ``"python"`` always uses the fallback.
    """
    ids = list(captions)
    flat = [_clean_line(c) for i in ids for c in captions[i]]
    notices: list[str] = []
    tokens: list[str] | None = None
    backend = "python"
    if tokenizer != "python":
        if java_available():
            try:
                tokens = _java_ptb_tokenize(flat)
                backend = "ptb"
            except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as e:
                notices.append(f"Stanford PTBTokenizer failed ({e}); used the pure-Python PTB tokenizer instead")
        else:
            notices.append(
                "Java not found: captions tokenised with the pure-Python PTB tokenizer instead of "
                "pycocoevalcap's Stanford PTBTokenizer (identical on ordinary captions, may differ on rare constructs)"
            )
    if tokens is None:
        tokens = [python_ptb_tokenize(c) for c in flat]
    out: dict[Hashable, list[str]] = {}
    pos = 0
    for i in ids:
        n = len(captions[i])
        out[i] = tokens[pos : pos + n]
        pos += n
    return out, backend, notices


# ---------------------------------------------------------------------------- scorers
def _run_meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, scores = meteor.compute_score(gts, res)
        return float(score), [float(s) for s in scores]
    finally:
        # pycocoevalcap's Meteor holds its lock across compute_score without try/finally and
        # its __del__ takes that lock: after a failure, garbage collection would deadlock.
        # Stop the JVM ourselves and hand __del__ a fresh lock.
        try:
            meteor.meteor_p.kill()
            meteor.meteor_p.wait(timeout=30)
            for stream in (meteor.meteor_p.stdin, meteor.meteor_p.stdout, meteor.meteor_p.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        finally:
            meteor.lock = threading.Lock()


def _run_spice(gts: dict, res: dict) -> tuple[float, list[float]]:
    from pycocoevalcap.spice.spice import Spice

    # Spice() calls get_stanford_models(), which downloads only when the jars are absent; the
    # caller has checked they are present, so constructing it is safe.
    score, scores = Spice().compute_score(gts, res)
    return float(score), [float(s["All"]["f"]) for s in scores]


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    metrics: Iterable[str] = DEFAULT_METRICS,
    tokenizer: TokenizerChoice = "auto",
) -> CaptionScores:
    """COCO caption metrics of ``predictions`` ({id: caption}) against ``references``
    ({id: [reference captions]}).

    Scored over the ids in ``predictions`` (as the COCO evaluation scores the images in the
    results file); a prediction whose id has no references raises, references without a
    prediction are ignored with a notice. CIDEr is pycocoevalcap's ``Cider``, i.e. CIDEr-D
    (clipped counts, length penalty, x10), with document frequencies from these references,
    so it depends on the evaluated set: compare CIDEr only across the same image set.

    Args:
        metrics: any of ``"bleu"`` (Bleu_1..4), ``"cider"``, ``"rouge"`` (ROUGE_L),
            ``"meteor"``, ``"spice"``.
        tokenizer: ``"auto"`` (PTBTokenizer with Java, else the Python fallback), ``"ptb"``
            (same, but the fallback is noted as a deviation from what was asked), ``"python"``.

    Returns:
        :class:`CaptionScores`: ``{"Bleu_1": ..., "CIDEr": ..., ...}`` for the metrics that
        ran; ``.skipped`` names the others and why.
    """
    wanted = list(dict.fromkeys(m.lower() for m in metrics))
    unknown = [m for m in wanted if m not in METRIC_KEYS]
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; choose from {sorted(METRIC_KEYS)}")
    if not predictions:
        raise ValueError("caption_metrics needs at least one prediction")
    missing = [i for i in predictions if i not in references or len(references[i]) == 0]
    if missing:
        raise ValueError(f"{len(missing)} predictions have no reference captions, e.g. ids {missing[:5]}")
    if tokenizer not in ("auto", "ptb", "python"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'python', got {tokenizer!r}")

    result = CaptionScores()
    extra = len(set(references) - set(predictions))
    if extra:
        result.notices.append(f"{extra} images have references but no prediction; they are not scored")

    ids = list(predictions)
    # One tokeniser run over references and predictions together: one JVM start, one backend.
    both = {("ref", i): list(references[i]) for i in ids} | {("pred", i): [predictions[i]] for i in ids}
    tokenised, backend, notes = tokenize_captions(both, tokenizer=tokenizer)
    gts = {i: tokenised[("ref", i)] for i in ids}
    res = {i: tokenised[("pred", i)] for i in ids}
    result.tokenizer = backend
    result.notices += notes

    java = java_available() if any(m in wanted for m in ("meteor", "spice")) else False
    for name in wanted:
        keys = METRIC_KEYS[name]
        try:
            if name == "bleu":
                from pycocoevalcap.bleu.bleu import Bleu

                scores, per = Bleu(4).compute_score(gts, res, verbose=0)
                for key, s, p in zip(keys, scores, per):
                    result[key] = float(s)
                    result.per_image[key] = dict(zip(ids, map(float, p)))
                continue
            if name == "cider":
                from pycocoevalcap.cider.cider import Cider

                score, per = Cider().compute_score(gts, res)
            elif name == "rouge":
                from pycocoevalcap.rouge.rouge import Rouge

                score, per = Rouge().compute_score(gts, res)
            elif name == "meteor":
                if not java:
                    result.skipped[name] = "Java is not available (METEOR runs meteor-1.5.jar)"
                    continue
                score, per = _run_meteor(gts, res)
            else:  # spice
                if not java:
                    result.skipped[name] = "Java is not available (SPICE runs spice-1.0.jar)"
                    continue
                absent = spice_models_missing()
                if absent:
                    result.skipped[name] = (
                        "Stanford CoreNLP 3.6.0 models are not on disk ("
                        + ", ".join(p.name for p in absent)
                        + "); pycocoevalcap would download them, which we never do. Run "
                        "`python -m pycocoevalcap.spice.get_stanford_models` where a network is available to enable SPICE"
                    )
                    continue
                score, per = _run_spice(gts, res)
        except Exception as e:  # a scorer failure must not lose the other metrics
            if name in ("bleu", "cider", "rouge"):
                raise
            result.skipped[name] = f"{type(e).__name__}: {e}"
            continue
        result[keys[0]] = float(score)
        result.per_image[keys[0]] = dict(zip(ids, map(float, per)))

    for name, why in result.skipped.items():
        result.notices.append(f"{name} skipped: {why}")
    for note in result.notices:
        logger.warning("caption metrics: %s", note)
    return result


__all__ = [
    "CaptionScores",
    "DEFAULT_METRICS",
    "METRIC_KEYS",
    "PTB_PUNCTUATIONS",
    "caption_metrics",
    "java_available",
    "python_ptb_tokenize",
    "spice_models_missing",
    "tokenize_captions",
]
