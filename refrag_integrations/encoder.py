"""ChunkEncoder: a small bidirectional encoder + pooling + a 2-layer MLP projector.

c_i = Enc(C_i) is the pre-projection chunk vector (what the store persists); e_i = phi(c_i) is the
projected vector that takes one position in the decoder's input, in place of the chunk's k tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

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
        encoder: a Hugging Face ``AutoModel`` encoder (e.g. all-MiniLM-L6-v2, RoBERTa).
        tokenizer: the encoder's tokenizer.
        decoder_dim: the decoder's hidden size (output width of the projector).
        pooling: ``"mean"`` (masked mean of token states) or ``"cls"`` (first token).
        projector_hidden: hidden width of the projector (default: ``decoder_dim``).
        target_norm: if given, scale the freshly initialised projector so its outputs have this
            mean L2 norm (the decoder's mean token-embedding norm).
        max_length: encoder token limit per chunk text.

    Example:
        >>> enc = ChunkEncoder(encoder, tok, decoder_dim=576)   # doctest: +SKIP
        >>> c = enc.encode(["first chunk text", "second chunk text"])  # (2, 384)
        >>> e = enc.project(c)                                  # (2, 576)
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
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}.")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.encoder_dim = int(encoder.config.hidden_size)
        self.decoder_dim = int(decoder_dim)
        self.projector = Projector(self.encoder_dim, self.decoder_dim, projector_hidden)
        if target_norm is not None:
            self.match_output_norm(target_norm)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]  # (N, d_enc)
        mask = mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (N, d_enc)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Pre-projection chunk vectors c_i for chunk texts, shape ``(len(texts), encoder_dim)``.

        Gradients flow when the module is in training mode and grad is enabled.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of chunk texts, not a single str.")
        if len(texts) == 0:
            return torch.zeros(0, self.encoder_dim, device=self.device)
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.encoder(**batch).last_hidden_state  # (N, T, d_enc)
            out.append(self._pool(hidden, batch["attention_mask"]).float())
        return torch.cat(out, 0)

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
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(chunk_encoder.encoder.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy())
    h.update(tokenizer_digest(chunk_encoder.tokenizer).encode())
    h.update(tokenizer_digest(tokenizer).encode())
    return h.hexdigest()[:16]
