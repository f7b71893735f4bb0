"""Evaluation: COCO caption metrics, VQA accuracy, image-text retrieval, result reports.

    from qformer.eval import caption_metrics, vqa_score, evaluate_retrieval, write_results

Every metric function returns a ``dict`` of numbers (caption and retrieval results carry extra
attributes: skipped metrics with reasons, score matrices), ready for :func:`write_results`.
Nothing here downloads anything: metrics that would need a download or a missing Java are
reported as skipped.
"""

from .captioning import CaptionScores, caption_metrics, java_available, python_ptb_tokenize, tokenize_captions
from .report import format_report, format_table, print_table, results_to_json, write_results
from .retrieval import (
    Blip2ItmScorer,
    RetrievalResult,
    SimMatrices,
    compute_sim_matrix,
    evaluate_retrieval,
    flatten_captions,
    itc_similarity,
    rerank_with_itm,
    retrieval_from_features,
    retrieval_metrics,
)
from .vqa import (
    VQA_PROMPT_OPT,
    VQA_PROMPT_T5,
    VQADecodeSettings,
    exact_match_accuracy,
    normalize_answer,
    vqa_accuracy,
    vqa_accuracy_simple,
    vqa_prompt,
    vqa_score,
)

__all__ = [
    "Blip2ItmScorer",
    "CaptionScores",
    "RetrievalResult",
    "SimMatrices",
    "VQADecodeSettings",
    "VQA_PROMPT_OPT",
    "VQA_PROMPT_T5",
    "caption_metrics",
    "compute_sim_matrix",
    "evaluate_retrieval",
    "exact_match_accuracy",
    "flatten_captions",
    "format_report",
    "format_table",
    "itc_similarity",
    "java_available",
    "normalize_answer",
    "print_table",
    "python_ptb_tokenize",
    "rerank_with_itm",
    "results_to_json",
    "retrieval_from_features",
    "retrieval_metrics",
    "tokenize_captions",
    "vqa_accuracy",
    "vqa_accuracy_simple",
    "vqa_prompt",
    "vqa_score",
    "write_results",
]
