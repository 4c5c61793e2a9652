"""refrag-integrations: REFRAG compressed RAG decoding (arXiv 2509.01092) for Hugging Face
decoders, with LangChain and LlamaIndex adapters.

Imports no optional framework: the adapters live in ``refrag_integrations.langchain`` and
``refrag_integrations.llama_index``.
"""

from .checkpoint import load_checkpoint, save_checkpoint, save_engine
from .chunking import Chunk, chunk_passage, passage_id
from .config import RefragConfig
from .encoder import ChunkEncoder, Projector
from .engine import (
    Budget,
    ChunkVectors,
    Expand,
    GenerationResult,
    GenerationStats,
    PreparedInput,
    RagPrompt,
    RefragEngine,
    RegisteredPassage,
    TokenStream,
    UntrainedProjectorWarning,
)
from .models import ModelNotFoundError, load_decoder, load_encoder
from .policy import (
    ExpandAll,
    ExpandNone,
    ExpansionBudget,
    ExpansionPolicy,
    LearnedPolicy,
    PerplexityDescPolicy,
    QueryRelevancePolicy,
    RandomPolicy,
    load_policy,
    make_policy,
    resolve_policy,
)
from .store import ChunkStore

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it ([tool.setuptools.dynamic])

__all__ = [
    "Budget",
    "Chunk",
    "ChunkEncoder",
    "ChunkStore",
    "ChunkVectors",
    "Expand",
    "ExpandAll",
    "ExpandNone",
    "ExpansionBudget",
    "ExpansionPolicy",
    "GenerationResult",
    "GenerationStats",
    "LearnedPolicy",
    "ModelNotFoundError",
    "PerplexityDescPolicy",
    "PreparedInput",
    "Projector",
    "QueryRelevancePolicy",
    "RagPrompt",
    "RandomPolicy",
    "RefragConfig",
    "RefragEngine",
    "RegisteredPassage",
    "TokenStream",
    "UntrainedProjectorWarning",
    "chunk_passage",
    "load_checkpoint",
    "load_decoder",
    "load_encoder",
    "load_policy",
    "make_policy",
    "passage_id",
    "resolve_policy",
    "save_checkpoint",
    "save_engine",
]
