"""Defaults of the evaluation harness (`refrag bench`, `refrag eval qa|ppl`): the one place for
its numbers, next to the package-wide ones in :mod:`refrag_integrations.config`."""

from __future__ import annotations

from ..config import DEFAULT_ENCODER, DEFAULT_INDEX_BATCH_SIZE

# --------------------------------------------------------------------------- shared data
# File names inside ../shared/data (see its README) and the agreed NQ-open splits (1-based lines).
NQ_FILE = "nq-open-oracle.jsonl.gz"
NQ_TRAIN_LINES = (1, 2000)
NQ_EVAL_LINES = (2001, 2655)  # never tune on these
ENWIKI_FILE = "enwiki-sample-articles.jsonl"
WIKITEXT_TEST = "wikitext2-test.txt"  # held out for perplexity

# --------------------------------------------------------------------------- metrics
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0

# --------------------------------------------------------------------------- refrag bench
BENCH_LENGTHS = (512, 1024, 2048, 4096, 8192)  # context tokens s
BENCH_KS = (8, 16, 32)  # compression rates k
BENCH_PS = (0.0, 0.1, 0.25)  # expand fractions p
BENCH_REPEATS = 3  # timed repeats per setting (median), after one untimed warm-up
BENCH_OUTPUT_TOKENS = 32  # fixed output length for TTIT and throughput (EOS ignored)
BENCH_POLICY = "relevance"  # picks the p L expanded chunks (query-aware, encodes the query)
BENCH_CORPUS = "nq"  # contexts from NQ gold passages ("nq") or Wikipedia articles ("wiki")
BENCH_CORPORA = ("nq", "wiki")
BENCH_WIKI_PASSAGE_TOKENS = 256  # passage size when cutting Wikipedia articles (a multiple of every k)
BENCH_WIKI_QUESTION = "What are these passages about?"
BENCH_QUICK = {"lengths": (512, 1024), "ks": (16,), "ps": (0.0,), "repeats": 1, "output_tokens": 8}
# `refrag bench --concurrency`: throughput of concurrent requests (issue 17's settings); k defaults
# to the checkpoint's own.
THROUGHPUT_LENGTHS = (4096,)
THROUGHPUT_PS = (0.0, 0.25)
THROUGHPUT_REQUESTS_PER_CLIENT = 4  # timed requests each concurrent client sends, one after another
THROUGHPUT_QUICK = {"lengths": (512,), "ps": (0.0,), "repeats": 1, "output_tokens": 8}

# --------------------------------------------------------------------------- refrag bench encoders
# The chunk-encoder options, ENCODER[@CONTEXT] (docs/training.md run 15, arms A, B, D, E): MiniLM per
# chunk (the shipped default), MiniLM pooled over its passage, the decoder's first 8 layers per chunk
# and per passage.
ENCODER_BENCH_OPTIONS = (DEFAULT_ENCODER, f"{DEFAULT_ENCODER}@passage", "decoder:8", "decoder:8@passage")
ENCODER_BENCH_PASSAGE_COUNTS = (1, 5, 10)  # N = the first eval question's gold + N-1 distractors (as eval qa)
ENCODER_BENCH_REPEATS = 3  # timed repeats per setting (median), after one untimed warm-up
ENCODER_BENCH_INDEX_PASSAGES = DEFAULT_INDEX_BATCH_SIZE  # one `refrag index` batch
ENCODER_BENCH_OUTPUT_TOKENS = 2  # TTFT is what is compared; a second token keeps TTIT defined
ENCODER_BENCH_QUICK = {"passage_counts": (1, 5), "repeats": 1, "index_passages": 8}

# --------------------------------------------------------------------------- refrag eval qa
QA_PASSAGE_COUNTS = (1, 5, 10, 20)  # N = gold + N-1 distractors (or top-N retrieved)
QA_POLICIES = ("relevance", "random")  # with p > 0; p = 0 is one setting ("none")
QA_PS = (0.0, 0.1, 0.25)
QA_MAX_NEW_TOKENS = 32  # NQ answers are a few words
QA_SEED = 0  # distractor choice and gold position
QA_RETRIEVAL_COLLECTION = "nq_gold_passages"

# --------------------------------------------------------------------------- refrag eval ppl
PPL_CONTEXT_TOKENS = 512  # s
PPL_CONTINUATION_TOKENS = 128  # o
PPL_WINDOWS = 100  # non-overlapping (s + o)-token windows of the held-out text
PPL_KS = BENCH_KS
PPL_PS = (0.0,)  # p > 0 expands a random fraction of chunks (the paper's mixed-input setting)

# --------------------------------------------------------------------------- report
DEFAULT_BENCH_DIR = "runs/bench"
DEFAULT_ENCODER_BENCH_DIR = "runs/bench-encoders"
DEFAULT_QA_DIR = "runs/eval-qa"
DEFAULT_PPL_DIR = "runs/eval-ppl"
DEFAULT_CAPACITY_DIR = "runs/eval-capacity"
DEFAULT_LAYER_PROBE_DIR = "runs/eval-layers"
DEFAULT_DOC = "docs/benchmarks.md"
