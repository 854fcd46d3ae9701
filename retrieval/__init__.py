"""modalign.retrieval: the one embedding loop, embedding shards, FAISS indexes and retrieval
metrics.

The public surface of the layer (one import path per thing)::

    from modalign.retrieval import embed_source, write_embedding_shards, CorpusIndex, VectorIndex
    from modalign.retrieval import IndexBuildOptions, build_corpus_index
"""

from __future__ import annotations

from modalign.retrieval.embed import Embeddings, EncoderModel, embed_source
from modalign.retrieval.embed_shards import read_embedding_shards, write_embedding_shards
from modalign.retrieval.evaluate import evaluate_pairs, make_validator
from modalign.retrieval.index import IndexBuildOptions, SearchResult, VectorIndex
from modalign.retrieval.index.corpus import CorpusIndex, Hit, Query, build_corpus_index

__all__ = [
    "CorpusIndex",
    "Embeddings",
    "EncoderModel",
    "Hit",
    "IndexBuildOptions",
    "Query",
    "SearchResult",
    "VectorIndex",
    "build_corpus_index",
    "embed_source",
    "evaluate_pairs",
    "make_validator",
    "read_embedding_shards",
    "write_embedding_shards",
]
