"""recsys: a multimodal recommender.

Stages, one folder each: ``recsys`` (content model, embedder, data, metrics, CLI) -> ``features``
(Feast) -> ``training`` (Lightning two-tower, embedder training) -> ``serving`` (FAISS, reranker,
HTTP) -> ``notebooks`` (A/B analysis).
"""

__version__ = "0.1.0"
