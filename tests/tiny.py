"""Tiny random models built from configs (no download), for fast unit tests.

``make_tiny_models(root)`` writes a 2-layer Llama decoder with a byte-level BPE tokenizer trained
on a paragraph of real text, and a 2-layer BERT encoder, as ordinary local model directories, so
the same loading code path as for real models is exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

# A real paragraph (WikiText-2 test split, CC BY-SA 3.0) to train the tiny BPE vocabulary on.
CORPUS = (
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring role "
    "on the television series The Bill in 2000. This was followed by a starring role in the play "
    "Herons written by Simon Stephens, which was performed in 2001 at the Royal Court Theatre. He "
    "had a guest role in the television series Judge John Deed in 2002. In 2004 Boulter landed a "
    "role as Craig in the episode Teddy's Story of the television series The Long Firm; he starred "
    "alongside actors Mark Strong and Derek Jacobi. He was cast in the 2005 theatre productions of "
    "the Philip Ridley play Mercury Fur, which was performed at the Drum Theatre in Plymouth and the "
    "Menier Chocolate Factory in London. Question: Answer the question using the passages. "
    "Who is the Eiffel Tower named after? Gustave Eiffel designed the tower in Paris, France. "
    "0123456789 .,;:!?'\"()[]-"
)

SPECIAL = ["<s>", "<|im_start|>", "<|im_end|>", "<pad>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


class FakeEmbedder:
    """A deterministic bag-of-characters retrieval embedder: index and store tests that need no model."""

    def __init__(self, name: str = "fake", dim: int = 16) -> None:
        self.name, self.dim, self.fingerprint = name, dim, f"{name}-{dim}"

    def embed(self, texts):
        import numpy as np

        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                out[i, ord(ch) % self.dim] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-9)


def make_tiny_models(root: Path, chat: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny decoder and encoder under ``root``; return their directories."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = _tokenizer(chat)
    dec_dir, enc_dir = root / "tiny-decoder", root / "tiny-encoder"
    dcfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,  # the engine checks it
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(dcfg).save_pretrained(dec_dir)
    tok.save_pretrained(dec_dir)
    ecfg = BertConfig(
        vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
    )
    BertModel(ecfg).save_pretrained(enc_dir)
    tok.save_pretrained(enc_dir)
    return dec_dir, enc_dir


def make_pdf(lines: list[str]) -> bytes:
    """A minimal one-page PDF with the given text lines (Helvetica), with a correct xref table."""
    text = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(text)} >>\nstream\n{text}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


class DecoderCalls:
    """Counts an engine's decoder forwards (wraps ``engine.decoder_forward`` on the instance).

    Records each call's batch size (``sizes``; ``prefills`` for the calls that read
    ``inputs_embeds``). With ``force``, every call's next token is that token id (text whose
    pieces the test knows); with ``script``, the next token after the i-th decoder step of a request
    (0 = its prefill) is ``script[i]``. With
    ``pause_after=n``, call n and later wait until ``resume`` is set (so a test can act between
    two decoder steps without timing anything).
    """

    def __init__(self, engine, force: int | None = None, script=None, pause_after: int | None = None) -> None:
        import threading

        self.sizes: list[int] = []
        self.prefills: list[int] = []
        self.force, self.script, self.pause_after = force, script, pause_after
        self.resume = threading.Event()
        self._lock = threading.Lock()
        self._step = 0  # decoder steps since the last prefill
        self._original = engine.decoder_forward
        engine.decoder_forward = self

    def __call__(self, cache=None, **inputs):
        x = inputs["inputs_embeds"] if "inputs_embeds" in inputs else inputs["input_ids"]
        with self._lock:
            n = len(self.sizes)
            self.sizes.append(int(x.shape[0]))
            if "inputs_embeds" in inputs:
                self.prefills.append(int(x.shape[0]))
                self._step = 0
            step = self._step
            self._step += 1
        if self.pause_after is not None and n >= self.pause_after:
            self.resume.wait(60)
        out = self._original(cache, **inputs)
        tok = self.force if self.script is None else self.script[min(step, len(self.script) - 1)]
        if tok is not None:
            out.logits[:, -1, :] = -1e4
            out.logits[:, -1, tok] = 1e4
        return out
