"""ChunkEncoder: an encoder + pooling + a 2-layer MLP projector.

c_i = Enc(C_i) is the pre-projection chunk vector (what the store persists); e_i = phi(c_i) is the
projected vector that takes one position in the decoder's input, in place of the chunk's k tokens.

Two choices shape c_i (both in :class:`~refrag_integrations.config.RefragConfig`):

- ``chunk_context``: ``"chunk"`` encodes every chunk alone (the paper); ``"passage"`` encodes the
  whole passage once and mean-pools each chunk's token span, so a chunk's vector knows its
  neighbours. Either way the vectors are computed once per passage and stored per chunk.
- the encoder: a bidirectional text encoder (all-MiniLM-L6-v2, RoBERTa) that reads each chunk's
  text, or the decoder's own first N layers (``encoder="decoder:N"``), which read the chunk's
  decoder tokens directly after one "sink" token (the position that absorbs attention in causal
  LMs; it is not pooled).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .config import PASSAGE_ENCODER_MAX_TOKENS

if TYPE_CHECKING:  # pragma: no cover
    from .chunking import Chunk

# Generic sentences used once at construction to match the projector's output scale to the
# decoder's token-embedding norm (so an untrained projector does not feed the decoder vectors
# orders of magnitude off; the paper's public reimplementations got this wrong).
_SCALE_PROBES = (
    "The river flows through the old town before it reaches the sea.",
    "In 1905 he published four papers that changed physics.",
    "The committee approved the budget after a long debate.",
    "Photosynthesis converts light energy into chemical energy.",
    "She played the violin in the national orchestra for ten years.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Mount Everest is the highest mountain above sea level.",
    "The software update fixed a bug in the network driver.",
)
# Encoder forward passes are batched up to this many (padded) tokens.
_MAX_BATCH_TOKENS = 16384


class Projector(nn.Module):
    """phi: the paper's 2-layer MLP from encoder width to decoder width (hidden = decoder width)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or out_dim
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, c: torch.Tensor) -> torch.Tensor:  # (..., in_dim) -> (..., out_dim)
        return self.fc2(self.act(self.fc1(c)))


class ChunkEncoder(nn.Module):
    """Encoder + pooling + projector, batched.

    Args:
        encoder: a Hugging Face ``AutoModel`` (e.g. all-MiniLM-L6-v2, RoBERTa, or the decoder's first
            layers from :func:`refrag_integrations.models.load_encoder`).
        tokenizer: the encoder's tokenizer (the decoder's when ``reads_decoder_tokens``).
        decoder_dim: the decoder's hidden size (output width of the projector).
        pooling: ``"mean"`` (masked mean of token states) or ``"cls"`` (first token; only with
            ``chunk_context="chunk"`` and a text encoder).
        projector_hidden: hidden width of the projector (default: ``decoder_dim``).
        target_norm: if given, scale the freshly initialised projector so its outputs have this
            mean L2 norm (the decoder's mean token-embedding norm).
        max_length: encoder token limit per chunk text (``chunk_context="chunk"``).
        chunk_context: ``"chunk"`` (each chunk alone) or ``"passage"`` (the passage encoded once,
            each chunk's span pooled; passages longer than ``passage_max_length`` encoder tokens are
            encoded in windows of whole chunks).
        reads_decoder_tokens: the encoder reads the chunks' decoder token ids (it is built from the
            decoder) instead of their text.
        passage_max_length: encoder token limit of one passage window.

    Example:
        >>> enc = ChunkEncoder(encoder, tok, decoder_dim=576)   # doctest: +SKIP
        >>> c = enc.encode(["first chunk text", "second chunk text"])  # (2, 384)
        >>> e = enc.project(c)                                  # (2, 576)
        >>> per_passage = enc.encode_passages([engine.chunk(p) for p in passages])  # [(L_i, 384), ...]
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        decoder_dim: int,
        pooling: str = "mean",
        projector_hidden: int | None = None,
        target_norm: float | None = None,
        max_length: int = 128,
        chunk_context: str = "chunk",
        reads_decoder_tokens: bool = False,
        passage_max_length: int = PASSAGE_ENCODER_MAX_TOKENS,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}.")
        if chunk_context not in ("chunk", "passage"):
            raise ValueError(f"chunk_context must be 'chunk' or 'passage', got {chunk_context!r}.")
        if pooling == "cls" and (chunk_context == "passage" or reads_decoder_tokens):
            raise ValueError(
                "pooling='cls' needs a text encoder that reads each chunk alone; use pooling='mean' with "
                f"chunk_context={chunk_context!r}" + (" and a decoder-layer encoder." if reads_decoder_tokens else ".")
            )
        if passage_max_length < 8:
            raise ValueError(f"passage_max_length must be >= 8 tokens, got {passage_max_length!r}.")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.chunk_context = chunk_context
        self.reads_decoder_tokens = bool(reads_decoder_tokens)
        self.passage_max_length = int(passage_max_length)
        self.encoder_dim = int(encoder.config.hidden_size)
        self.decoder_dim = int(decoder_dim)
        self.projector = Projector(self.encoder_dim, self.decoder_dim, projector_hidden)
        if target_norm is not None:
            self.match_output_norm(target_norm)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def sink_token_id(self) -> int:
        """The token a decoder-layer encoder reads first (BOS, else EOS); it is never pooled."""
        tok = self.tokenizer
        sink = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if sink is None:
            raise ValueError("a decoder-layer encoder needs a tokenizer with a BOS or EOS token.")
        return int(sink)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]  # (N, d_enc)
        mask = mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (N, d_enc)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """One vector per text, shape ``(len(texts), encoder_dim)``: chunk texts encoded alone (the
        paper's chunk vectors when ``chunk_context="chunk"``), or a query for relevance scoring.

        Texts are read as plain text: a special-token string inside one (``[SEP]``, ``</s>``,
        ``<|im_start|>``) is split into ordinary tokens, never read as the encoder tokenizer's
        control token, as the decoder side reads passages
        (:func:`~refrag_integrations.chunking.tokenize_text`); only the encoder's own wrapper
        (e.g. ``[CLS]`` ... ``[SEP]``) is added.

        Gradients flow when the module is in training mode and grad is enabled.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not a single str.")
        if len(texts) == 0:
            return torch.zeros(0, self.encoder_dim, device=self.device)
        if self.reads_decoder_tokens:
            from .chunking import tokenize_text

            seqs, labels = [], []
            for row, text in enumerate(texts):
                ids = tokenize_text(text, self.tokenizer)[0][: self.max_length]
                seqs.append([self.sink_token_id] + ids)
                labels.append([-1] + [row] * len(ids))
            return self._encode_labelled(seqs, labels, len(texts))
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
                split_special_tokens=True,  # "[SEP]" in a passage is text; the wrapper is still added
            ).to(self.device)
            hidden = self.encoder(**batch).last_hidden_state  # (N, T, d_enc)
            out.append(self._pool(hidden, batch["attention_mask"]).float())
        return torch.cat(out, 0)

    def encode_passages(self, chunk_lists: Sequence[Sequence["Chunk"]]) -> list[torch.Tensor]:
        """Pre-projection chunk vectors of whole passages, one ``(L_i, encoder_dim)`` tensor each.

        This is the one entry point for chunk vectors (engine, index, training): every passage's
        chunks are encoded in one batched pass, as ``chunk_context`` and the encoder prescribe.

        Args:
            chunk_lists: each passage's chunks (:func:`refrag_integrations.chunking.chunk_passage`),
                in order; their texts tile the passage.
        """
        counts = [len(cl) for cl in chunk_lists]
        total = sum(counts)
        if total == 0:
            return [torch.zeros(0, self.encoder_dim, device=self.device) for _ in counts]
        if self.chunk_context == "chunk" and not self.reads_decoder_tokens:
            flat = self.encode([c.text for cl in chunk_lists for c in cl])  # (sum L, d_enc)
        else:
            seqs: list[list[int]] = []
            labels: list[list[int]] = []
            row = 0
            for cl in chunk_lists:
                if self.chunk_context == "chunk":  # decoder tokens, each chunk alone
                    for c in cl:
                        ids = list(c.token_ids)[: self.max_length]
                        seqs.append([self.sink_token_id] + ids)
                        labels.append([-1] + [row] * len(ids))
                        row += 1
                elif self.reads_decoder_tokens:
                    self._passage_windows_decoder(cl, row, seqs, labels)
                    row += len(cl)
                else:
                    self._passage_windows_text(cl, row, seqs, labels)
                    row += len(cl)
            flat = self._encode_labelled(seqs, labels, total)
        return list(torch.split(flat, counts, 0))

    def _passage_windows_decoder(self, chunks: Sequence["Chunk"], row0: int, seqs: list, labels: list) -> None:
        """Windows of whole chunks of decoder tokens, each after the sink token."""
        per_chunk = [list(c.token_ids) for c in chunks]
        for ids, lab in _windows(per_chunk, row0, self.passage_max_length - 1):
            seqs.append([self.sink_token_id] + ids)
            labels.append([-1] + lab)

    def _passage_windows_text(self, chunks: Sequence["Chunk"], row0: int, seqs: list, labels: list) -> None:
        """The passage's text tokenized once (each encoder token belongs to the chunk its first
        character falls in), cut into windows of whole chunks, with the encoder's own special
        tokens around each window (never pooled)."""
        tok = self.tokenizer
        starts, pos = [], 0
        for c in chunks:
            starts.append(pos)
            pos += len(c.text)
        enc = tok(
            "".join(c.text for c in chunks), add_special_tokens=False, return_offsets_mapping=True,
            split_special_tokens=True,
        )
        per_chunk: list[list[int]] = [[] for _ in chunks]
        for t, (a, _b) in zip(enc["input_ids"], enc["offset_mapping"]):
            per_chunk[max(bisect.bisect_right(starts, a) - 1, 0)].append(int(t))
        prefix, suffix = _special_wrap(tok)
        for ids, lab in _windows(per_chunk, row0, max(1, self.passage_max_length - len(prefix) - len(suffix))):
            seqs.append(prefix + ids + suffix)
            labels.append([-1] * len(prefix) + lab + [-1] * len(suffix))

    def _encode_labelled(self, seqs: list[list[int]], labels: list[list[int]], n_out: int) -> torch.Tensor:
        """Run the encoder over token sequences and mean-pool the states labelled with each output
        row (label -1: not pooled). Returns ``(n_out, encoder_dim)`` float32; rows no token is
        labelled with are zero."""
        dev = self.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        sums = torch.zeros(n_out, self.encoder_dim, device=dev)
        counts = torch.zeros(n_out, device=dev)
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and (j + 1 - i) * len(seqs[order[j]]) <= _MAX_BATCH_TOKENS:
                j += 1
            batch = order[i:j]
            T = max(len(seqs[b]) for b in batch)
            ids = torch.full((len(batch), T), pad, dtype=torch.long)
            lab = torch.full((len(batch), T), -1, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for r, b in enumerate(batch):
                n = len(seqs[b])
                ids[r, :n] = torch.tensor(seqs[b])
                lab[r, :n] = torch.tensor(labels[b])
                mask[r, :n] = 1
            ids, lab, mask = ids.to(dev), lab.to(dev), mask.to(dev)
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, T, d_enc)
            keep = lab >= 0
            rows = lab[keep]  # (n,)
            sums = sums.index_add(0, rows, hidden[keep])  # out of place: gradients flow in training
            counts = counts.index_add(0, rows, torch.ones_like(rows, dtype=counts.dtype))
            i = j
        return sums / counts.clamp(min=1.0).unsqueeze(-1)  # (n_out, d_enc)

    def project(self, c: torch.Tensor) -> torch.Tensor:
        """e_i = phi(c_i): map chunk vectors into the decoder's token-embedding space."""
        dtype = self.projector.fc1.weight.dtype
        return self.projector(c.to(device=self.projector.fc1.weight.device, dtype=dtype))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.project(self.encode(texts))

    @torch.no_grad()
    def match_output_norm(self, target_norm: float) -> float:
        """Rescale the projector's last layer so outputs on generic text have ``target_norm`` mean
        L2 norm. Returns the factor applied."""
        was_training = self.training
        self.eval()
        e = self.project(self.encode(list(_SCALE_PROBES)))
        current = float(e.norm(dim=-1).mean())
        factor = float(target_norm) / max(current, 1e-8)
        self.projector.fc2.weight.mul_(factor)
        self.projector.fc2.bias.mul_(factor)
        self.train(was_training)
        return factor


def _windows(per_chunk: list[list[int]], row0: int, limit: int) -> list[tuple[list[int], list[int]]]:
    """Group consecutive chunks' tokens into windows of at most ``limit`` tokens without splitting
    a chunk (a single chunk longer than ``limit`` is truncated). Returns (token ids, output row of
    each token) per window; chunk j of the passage is output row ``row0 + j``."""
    out: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    lab: list[int] = []
    for j, piece in enumerate(per_chunk):
        piece = piece[:limit]
        if ids and len(ids) + len(piece) > limit:
            out.append((ids, lab))
            ids, lab = [], []
        ids.extend(piece)
        lab.extend([row0 + j] * len(piece))
    if ids:
        out.append((ids, lab))
    return out


def _special_wrap(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text (e.g. BERT's [CLS] / [SEP])."""
    inner = list(tokenizer("a", add_special_tokens=False, split_special_tokens=True)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True, split_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(inner) + 1):
        if full[i : i + len(inner)] == inner:
            return full[:i], full[i + len(inner):]
    return [], []


# --------------------------------------------------------------------------- chunk-vector fingerprint

# Bump when the meaning of a stored chunk vector changes without any weight or setting changing
# (e.g. a new chunking rule): every existing fingerprint then stops matching.
CHUNK_VECTOR_FORMAT = 1


def tokenizer_digest(tokenizer: Any) -> str:
    """Hash of what decides how a tokenizer splits text. Per-call truncation / padding settings,
    which transformers writes into the backend on every call, are left out."""
    import hashlib
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        data = json.dumps(spec, sort_keys=True)
    else:
        data = json.dumps(sorted(tokenizer.get_vocab().items()))
    data += type(tokenizer).__name__ + json.dumps(sorted(map(str, tokenizer.all_special_tokens)))
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def compute_chunk_vector_fingerprint(chunk_encoder: ChunkEncoder, tokenizer: Any, k: int) -> str:
    """Fingerprint (16 hex digits) of everything a pre-projection chunk vector depends on.

    Hashes every byte of the encoder's weights (so a trained encoder delta anywhere changes it),
    the encoder's tokenizer, pooling and length limit, k, and the decoder's tokenizer (chunks are
    cut on decoder tokens). The projector is left out: stored vectors are taken before it.
    Usually called through :meth:`RefragEngine.chunk_vector_fingerprint`, which caches it.

    Example:
        >>> compute_chunk_vector_fingerprint(engine.chunk_encoder, engine.tokenizer, 16)  # doctest: +SKIP
        'c0ffee0123456789'
    """
    import hashlib
    import json

    h = hashlib.sha256()
    settings = {
        "format": CHUNK_VECTOR_FORMAT,
        "k": int(k),
        "pooling": chunk_encoder.pooling,
        "max_length": int(chunk_encoder.max_length),
        "encoder_class": type(chunk_encoder.encoder).__name__,
    }
    # Settings added later enter only when they differ from what earlier vectors used, so indexes
    # built before them keep their fingerprint.
    if chunk_encoder.chunk_context != "chunk":
        settings["chunk_context"] = chunk_encoder.chunk_context
        settings["passage_max_length"] = int(chunk_encoder.passage_max_length)
    if chunk_encoder.reads_decoder_tokens:
        settings["reads_decoder_tokens"] = True
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(chunk_encoder.encoder.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy())
    h.update(tokenizer_digest(chunk_encoder.tokenizer).encode())
    h.update(tokenizer_digest(tokenizer).encode())
    return h.hexdigest()[:16]
