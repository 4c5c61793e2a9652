"""refrag-integrations: REFRAG compressed RAG decoding (arXiv 2509.01092) for Hugging Face
decoders, with LangChain and LlamaIndex adapters.

Imports no optional framework: the adapters live in ``refrag_integrations.langchain`` and
``refrag_integrations.llama_index``.
"""

from .checkpoint import load_checkpoint, save_checkpoint, save_engine
from .chunking import Chunk, chunk_passage, passage_id
from .config import RefragConfig
from .encoder import ChunkEncoder, Projector
from .engine import GenerationResult, GenerationStats, PreparedInput, RefragEngine, TokenStream
from .models import ModelNotFoundError, load_decoder, load_encoder
from .policy import (
    ExpandAll,
    ExpandNone,
    ExpansionBudget,
    ExpansionPolicy,
    QueryRelevancePolicy,
    RandomPolicy,
    make_policy,
)

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it ([tool.setuptools.dynamic])

__all__ = [
    "Chunk",
    "ChunkEncoder",
    "ExpandAll",
    "ExpandNone",
    "ExpansionBudget",
    "ExpansionPolicy",
    "GenerationResult",
    "GenerationStats",
    "ModelNotFoundError",
    "PreparedInput",
    "Projector",
    "QueryRelevancePolicy",
    "RandomPolicy",
    "RefragConfig",
    "RefragEngine",
    "TokenStream",
    "chunk_passage",
    "load_checkpoint",
    "load_decoder",
    "load_encoder",
    "make_policy",
    "passage_id",
    "save_checkpoint",
    "save_engine",
]
