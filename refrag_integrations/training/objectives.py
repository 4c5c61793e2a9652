"""The training objectives on a RefragEngine's modules: reconstruction, next-paragraph (CPT,
mixed), RAG fine-tuning, and the evaluation measures that go with them.

All inputs are assembled exactly as at inference: one position per compressed chunk (its projected
vector), k token embeddings per expanded chunk, original order, contiguous positions.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RefragEngine


def window_chunk_vectors(engine: "RefragEngine", windows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Projected chunk vectors of token windows, ``(B*L, d)`` window-major: each window is one
    passage to the encoder (what ``chunk_context`` sees), cut into chunks of k tokens."""
    from ..chunking import chunks_from_token_ids

    k = engine.config.chunk_size
    chunk_lists = [chunks_from_token_ids(list(w), engine.tokenizer, k) for w in windows]
    c = torch.cat(engine.chunk_encoder.encode_passages(chunk_lists), 0)  # (B*L, d_enc)
    return engine.chunk_encoder.project(c)


def context_blocks(
    engine: "RefragEngine", ctx: torch.Tensor, expand: torch.Tensor | None = None
) -> torch.Tensor:
    """Mixed-input embeddings for context token windows.

    Args:
        ctx: ``(B, L*k)`` context token ids.
        expand: ``(B, L)`` bool, True = keep the chunk's k tokens; all rows must expand the same
            number of chunks so the batch has one length. None = compress all.

    Returns:
        ``(B, L + n_expanded*(k-1), d)`` input embeddings.
    """
    k = engine.config.chunk_size
    B, S = ctx.shape
    if S % k:
        raise ValueError(f"context length {S} is not a multiple of k={k}.")
    L = S // k
    vecs = window_chunk_vectors(engine, ctx.tolist())  # (B*L, d)
    embed = engine.decoder.get_input_embeddings()
    vecs = vecs.to(embed.weight.dtype).view(B, L, -1)  # (B, L, d)
    if expand is None or not bool(expand.any()):
        return vecs
    tok = embed(ctx).view(B, L, k, -1)  # (B, L, k, d)
    rows = []
    for b in range(B):
        parts = [tok[b, i] if expand[b, i] else vecs[b, i : i + 1] for i in range(L)]
        rows.append(torch.cat(parts, 0))
    lengths = {r.shape[0] for r in rows}
    if len(lengths) != 1:
        raise ValueError("every row of a batch must expand the same number of chunks.")
    return torch.stack(rows, 0)


def lm_loss(engine: "RefragEngine", prefix: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced loss of ``targets (B, T)`` after ``prefix (B, P, d)`` embeddings.
    Returns (per-token NLL (B, T), per-token correct (B, T))."""
    embed = engine.decoder.get_input_embeddings()
    tgt_emb = embed(targets[:, :-1])  # (B, T-1, d)
    inputs = torch.cat([prefix.to(tgt_emb.dtype), tgt_emb], 1)  # (B, P+T-1, d)
    T = targets.shape[1]
    pos = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand(inputs.shape[0], -1)
    out = engine.decoder(inputs_embeds=inputs, position_ids=pos, use_cache=False, logits_to_keep=T)
    logits = out.logits.float()  # (B, T, V)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
    correct = logits.argmax(-1) == targets
    return nll, correct


def reconstruction_loss(engine: "RefragEngine", windows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The decoder must reproduce all L*k context tokens autoregressively from the L chunk vectors
    (jointly over all chunks)."""
    prefix = context_blocks(engine, windows)  # (B, L, d)
    nll, correct = lm_loss(engine, prefix, windows)
    return nll.mean(), {"acc": float(correct.float().mean())}


def random_expansion(rng: random.Random, batch: int, num_chunks: int, p: float) -> torch.Tensor | None:
    """``(B, L)`` random expansion mask with the same count floor(p*L) per row (None if 0)."""
    n = int(p * num_chunks)
    if n == 0:
        return None
    mask = torch.zeros(batch, num_chunks, dtype=torch.bool)
    for b in range(batch):
        mask[b, rng.sample(range(num_chunks), n)] = True
    return mask


def continuation_loss(
    engine: "RefragEngine", context: torch.Tensor, continuation: torch.Tensor, expand: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """CPT / mixed: predict the next paragraph ``continuation (B, o)`` from the (mostly)
    compressed ``context (B, s)``."""
    prefix = context_blocks(engine, context, expand)
    nll, correct = lm_loss(engine, prefix, continuation)
    return nll.mean(), {"acc": float(correct.float().mean())}


@torch.no_grad()
def continuation_nll(
    engine: "RefragEngine", context: torch.Tensor | None, continuation: torch.Tensor, mode: str
) -> torch.Tensor:
    """Mean NLL per example of ``continuation`` given the context ``mode``: ``"none"`` (no
    context), ``"full"`` (context tokens) or ``"compressed"`` (chunk vectors). Returns ``(B,)``."""
    embed = engine.decoder.get_input_embeddings()
    if mode == "none":
        # No context: the first continuation token is predicted from BOS-free start, so score
        # tokens 2..o in every mode for a like-for-like comparison.
        prefix = embed(continuation[:, :1])
        nll, _ = lm_loss(engine, prefix, continuation[:, 1:])
        return nll.mean(1)
    if context is None:
        raise ValueError(f"mode {mode!r} needs a context.")
    if mode == "full":
        prefix = embed(context)
    elif mode == "compressed":
        prefix = context_blocks(engine, context)
    else:
        raise ValueError(f"mode must be 'none', 'full' or 'compressed', got {mode!r}.")
    prefix = torch.cat([prefix, embed(continuation[:, :1]).to(prefix.dtype)], 1)
    nll, _ = lm_loss(engine, prefix, continuation[:, 1:])
    return nll.mean(1)


@torch.no_grad()
def reconstruction_eval(
    engine: "RefragEngine", corpus, num_chunks: Sequence[int], examples: int, seed: int = 1234, batch: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Held-out reconstruction: token accuracy and log-PPL for each chunk count (a progress bar
    over the batches unless ``progress`` is False)."""
    from tqdm.auto import tqdm

    k = engine.config.chunk_size
    out = {}
    bar = tqdm(total=len(num_chunks) * math.ceil(examples / batch), desc="eval reconstruction", leave=False,
               dynamic_ncols=True, disable=not progress)
    for L in num_chunks:
        rng = random.Random(seed + L)
        wins = corpus.windows(rng, L * k, examples)
        nlls, accs = [], []
        for i in range(0, len(wins), batch):
            w = torch.tensor(wins[i : i + batch], device=engine.device)
            with engine.autocast():
                nll, correct = lm_loss(engine, context_blocks(engine, w), w)
            nlls.append(nll.mean(1).float().cpu())
            accs.append(correct.float().mean(1).cpu())
            bar.update(1)
        out[str(L)] = {"log_ppl": float(torch.cat(nlls).mean()), "token_acc": float(torch.cat(accs).mean())}
    bar.close()
    return out


@torch.no_grad()
def next_paragraph_eval(
    engine: "RefragEngine", corpus, num_chunks: int, cont_tokens: int, examples: int, seed: int = 4321, batch: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Held-out next-paragraph log-PPL with no context, full context and compressed context (a
    progress bar over the batches unless ``progress`` is False)."""
    from tqdm.auto import tqdm

    k = engine.config.chunk_size
    rng = random.Random(seed)
    wins = corpus.windows(rng, num_chunks * k + cont_tokens, examples)
    res: dict[str, list[torch.Tensor]] = {"none": [], "full": [], "compressed": []}
    for i in tqdm(range(0, len(wins), batch), desc="eval next paragraph", leave=False, dynamic_ncols=True,
                  disable=not progress):
        w = torch.tensor(wins[i : i + batch], device=engine.device)
        ctx, cont = w[:, : num_chunks * k], w[:, num_chunks * k :]
        with engine.autocast():
            for mode in res:
                res[mode].append(continuation_nll(engine, ctx, cont, mode).float().cpu())
    out = {f"log_ppl_{m}": float(torch.cat(v).mean()) for m, v in res.items()}
    gap = out["log_ppl_none"] - out["log_ppl_full"]
    out["gap_closed"] = (out["log_ppl_none"] - out["log_ppl_compressed"]) / gap if gap > 0 else float("nan")
    return out
