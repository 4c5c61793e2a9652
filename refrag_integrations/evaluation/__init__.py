"""Evaluation and benchmarks: QA metrics, latency/memory benchmark, QA and perplexity harnesses,
plots and the benchmark report. Heavy pieces (torch, matplotlib, chromadb) load lazily.

Example:
    >>> from refrag_integrations.evaluation import match, exact_match, f1_score
    >>> match("It was Gustave Eiffel.", ["Gustave Eiffel"]), exact_match("The Beatles", ["beatles"])
    (1.0, 1.0)
"""

from .metrics import ConfidenceInterval, bootstrap_ci, exact_match, f1_score, match, normalize_answer, qa_scores

__all__ = [
    "ConfidenceInterval",
    "bootstrap_ci",
    "exact_match",
    "f1_score",
    "match",
    "normalize_answer",
    "qa_scores",
]
