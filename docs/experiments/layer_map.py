"""Exploratory (issue 14, run 22 of docs/training.md): distil a small map on top of the decoder's
own layer-8 chunk summaries (run 21's `refrag eval layers`), decoder frozen or with a LoRA.

Student: the engine's p = 0 QA prompt (or a Wikipedia context of 128 tokens) with the chunk rows
replaced by map(summary), where summary = the chunk's mean hidden state at the input of block 8
(the passage run alone through the decoder). Arms:

- ``l8``: the rows are replaced at the input of block 8 (the residual stream; in-process only).
- ``in``: the rows are replaced at the decoder's input (what the engine and vLLM's
  ``prompt_embeds`` can carry); the map starts as a scaled identity.
- ``l8lora``: as ``l8``, plus a rank-8 LoRA on every linear of blocks 8-29 (the blocks that read
  the summaries); the teacher runs with the LoRA off.

Teacher: the same decoder reading the passage as tokens. Loss: T^2 KL (T = 2) on NQ *train*
answers (gold passage; half the examples) and on 32-token Wikipedia continuations after 128
context tokens (the other half). Resumable (``state.pt`` every 25 steps).

    python docs/experiments/layer_map.py train ARM OUT STEPS [BATCH]
    python docs/experiments/layer_map.py eval OUT LIMIT PROBE_DIR [init]

``eval`` scores the first LIMIT NQ eval questions as `refrag eval layers` does (gold answer NLL
and greedy Match with map(summaries) and with map(blank)); closed-book and full-context rows are
read from a `refrag eval layers` run over the same questions (PROBE_DIR). ``init``: the map as it
starts (untrained). THREADS sets torch's threads (default 1). Not part of the package: the engine
cannot serve the ``l8`` arms (its compressed chunks are input rows).
"""
import json
import os
import random
import statistics as stt
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from refrag_integrations.engine import GenerationStats, PreparedInput, RefragEngine
from refrag_integrations.evaluation.capacity import answer_ids, compressed_prompt, start_ids
from refrag_integrations.evaluation.data import load_qa, nq_path
from refrag_integrations.evaluation.layer_probe import (
    blank_vectors, chunk_summaries, decoder_layers, residual_rows_replaced)
from refrag_integrations.evaluation.metrics import bootstrap_ci, match
from refrag_integrations.training.data import read_documents
from refrag_integrations.training.distill import distill_loss, lora_disabled, target_logits
from refrag_integrations.training.lora import add_lora, load_lora_into_wrapped, lora_state

DATA = "../shared/data"
SRC = 8  # summaries from the input of block 8
ARMS = {"l8": {"inject": 8, "lora": 0}, "in": {"inject": 0, "lora": 0}, "l8lora": {"inject": 8, "lora": 8}}
LR, LORA_LR, T, QA_SHARE, CTX, CONT = 1e-3, 2e-4, 2.0, 0.5, 128, 32


class Map(nn.Module):
    """scale * s + MLP(s); the MLP's output layer starts at zero (a scaled identity at step 0)."""

    def __init__(self, d, scale, hidden=1152):
        super().__init__()
        self.scale = nn.Parameter(torch.full((d,), float(scale)))
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, s):
        return self.scale * s + self.down(F.gelu(self.up(s)))


def build(eng, arm):
    """The arm's map (and its LoRA wrapped into the decoder); returns (map, LoRA parameters)."""
    inject, rank = ARMS[arm]["inject"], ARMS[arm]["lora"]
    scale = 1.0
    if inject == 0:  # rms of the input embeddings over rms of layer-8 summaries
        emb = eng.decoder.get_input_embeddings().weight.detach()
        s = chunk_summaries(eng, load_qa(nq_path(DATA), "train")[0].passage, [SRC])[SRC]
        scale = float(emb.float().pow(2).mean().sqrt() / s.pow(2).mean().sqrt())
    lora = []
    if rank:
        for blk in list(decoder_layers(eng))[inject:]:
            add_lora(blk, rank)
        lora = [p for n, p in eng.decoder.named_parameters() if "lora_" in n]
    return Map(eng.decoder.config.hidden_size, scale), lora


def load_state(eng, m, s):
    m.load_state_dict(s["map"])
    if s.get("lora"):
        load_lora_into_wrapped(eng.decoder, {k: v for k, v in s["lora"].items() if not k.endswith("lora_scale")})


def with_rows(eng, arm, prefix, rows, v, fn):
    """fn(prefix) with the chunk rows replaced by v at the arm's injection point."""
    a, b = rows
    if ARMS[arm]["inject"] == 0:
        return fn(torch.cat([prefix[:a], v.to(prefix.dtype), prefix[b:]], 0))
    with residual_rows_replaced(eng, ARMS[arm]["inject"], rows, v):
        return fn(prefix)


def qa_example(eng, ex):
    tgt = torch.tensor(answer_ids(eng, ex.answers[0]))
    comp, rows = compressed_prompt(eng, ex.question, ex.passage)
    with torch.no_grad():
        full = eng.prepare_rag(ex.question, [ex.passage], "all").embeds
    return comp, rows, full, tgt, ex.passage


def wiki_example(eng, docs, rng):
    while True:
        doc = docs[rng.randrange(len(docs))]
        off = rng.randrange(max(1, len(doc) - 3000))
        ids = eng.tokenize(doc[off:off + 3000])
        if len(ids) >= CTX + CONT + 8:
            break
    ids = ids[4:]  # skip a probably cut first word
    ctx = eng.tokenizer.decode(ids[:CTX])
    chunks, start = eng.chunk(ctx), start_ids(eng)
    emb = eng.decoder.get_input_embeddings()
    with torch.no_grad():
        vec = eng.chunk_encoder.project(eng.chunk_vectors([ctx]).vectors[0]).float()
        st = emb(torch.tensor(start)).float()
        toks = emb(torch.tensor([t for c in chunks for t in c.token_ids])).float()
    rows = (len(start), len(start) + len(chunks))
    return torch.cat([st, vec], 0), rows, torch.cat([st, toks], 0), torch.tensor(ids[CTX:CTX + CONT]), ctx


def train(arm, out, steps, batch=8):
    out.mkdir(parents=True, exist_ok=True)
    eng = RefragEngine.from_pretrained()
    eng.decoder.requires_grad_(False)
    qa = load_qa(nq_path(DATA), "train")
    docs = read_documents(f"{DATA}/enwiki-2015-articles.jsonl.gz")
    m, lora = build(eng, arm)
    groups = [{"params": list(m.parameters()), "lr": LR}]
    if lora:
        for p in lora:
            p.requires_grad_(True)
        groups.append({"params": lora, "lr": LORA_LR})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    step, rng = 0, random.Random(0)
    state = out / "state.pt"
    if state.exists():
        s = torch.load(state, weights_only=False)
        load_state(eng, m, s)
        opt.load_state_dict(s["opt"])
        step = s["step"]
        rng.setstate(s["rng"])
        print("resumed at", step, flush=True)
    log = open(out / "log.jsonl", "a")
    while step < steps:
        t0, stats = time.time(), {"kl_qa": [], "kl_wiki": [], "agree": []}
        opt.zero_grad()
        for _ in range(batch):
            kind = "qa" if rng.random() < QA_SHARE else "wiki"
            if kind == "qa":
                comp, rows, full, tgt, passage = qa_example(eng, qa[rng.randrange(len(qa))])
            else:
                comp, rows, full, tgt, passage = wiki_example(eng, docs, rng)
            summ = chunk_summaries(eng, passage, [SRC])[SRC]
            if summ.shape[0] != rows[1] - rows[0]:
                continue
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.no_grad(), lora_disabled(eng.decoder):
                    teach = target_logits(eng, [full], [tgt])[0]
                stud = with_rows(eng, arm, comp, rows, m(summ), lambda p: target_logits(eng, [p], [tgt])[0])
                loss, st = distill_loss([stud], [teach], [tgt], T, 0.0)
            (loss / batch).backward()
            stats["kl_" + kind].append(st["kl"])
            stats["agree"].append(st["agree"])
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        step += 1
        rec = {"step": step, "s": round(time.time() - t0, 1),
               **{k: (sum(v) / len(v) if v else None) for k, v in stats.items()}}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(rec, flush=True)
        if step % 25 == 0 or step == steps:
            torch.save({"map": m.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng.getstate(), "arm": arm,
                        "lora": lora_state(eng.decoder) if lora else None}, str(state) + ".tmp")
            os.replace(str(state) + ".tmp", state)


def evaluate(run, limit, probe_dir, init=False):
    s = torch.load(run / "state.pt", weights_only=False)
    arm = s["arm"]
    eng = RefragEngine.from_pretrained()
    m, lora = build(eng, arm)
    if not init:
        load_state(eng, m, s)
    m.eval()
    exs = load_qa(nq_path(DATA), "eval")[:limit]
    blank = blank_vectors(eng, [e.passage for e in exs[:16]], [SRC])[SRC]
    out = run / (f"eval_init_{limit}.jsonl" if init else f"eval_step{s['step']}_{limit}.jsonl")
    done = {json.loads(line)["line"] for line in open(out)} if out.exists() else set()
    f = open(out, "a")

    def answer(embeds):
        p = PreparedInput(embeds=embeds, token_ids=[], stats=GenerationStats())
        return eng.generate_prepared([p], max_new_tokens=32)[0].text

    def nll_and_answer(tgt):
        return lambda p: (float(eng.score([p], tgt)[0]), answer(p))

    for ex in exs:
        if ex.line in done:
            continue
        tgt = answer_ids(eng, ex.answers[0])
        comp, rows = compressed_prompt(eng, ex.question, ex.passage)
        summ = chunk_summaries(eng, ex.passage, [SRC])[SRC]
        rec = {"line": ex.line}
        with torch.no_grad():
            if lora:  # the adapted decoder with the whole passage as tokens (does it keep the format?)
                nll, text = nll_and_answer(tgt)(eng.prepare_rag(ex.question, [ex.passage], "all").embeds)
                rec.update(nll_full_adapted=nll, match_full_adapted=match(text, ex.answers))
            for name, src in (("content", summ), ("blank", blank.expand(rows[1] - rows[0], -1))):
                nll, text = with_rows(eng, arm, comp, rows, m(src), nll_and_answer(tgt))
                rec.update({f"nll_{name}": nll, f"answer_{name}": text, f"match_{name}": match(text, ex.answers)})
        f.write(json.dumps(rec) + "\n")
        f.flush()
    records = [json.loads(line) for line in open(out)]
    base = {json.loads(line)["line"]: json.loads(line) for line in open(Path(probe_dir) / "examples.jsonl")}
    lines = [r["line"] for r in records]
    cb = stt.fmean(base[x]["nll_closed_book"] for x in lines)
    fu = stt.fmean(base[x]["nll_full"] for x in lines)
    print(f"{run.name} {'init' if init else 'step ' + str(s['step'])} n={len(records)} closed {cb:.3f} full {fu:.3f}")
    if lora:
        print(f"  full (adapted decoder): NLL {stt.fmean(r['nll_full_adapted'] for r in records):.3f} "
              f"Match {stt.fmean(r['match_full_adapted'] for r in records):.3f}")
    for name in ("content", "blank"):
        v = stt.fmean(r[f"nll_{name}"] for r in records)
        mt = stt.fmean(r[f"match_{name}"] for r in records)
        print(f"  {name}: NLL {v:.3f} gap closed {(cb - v) / (cb - fu):+.3f} Match {mt:.3f}")
    d = bootstrap_ci([r["nll_blank"] - r["nll_content"] for r in records])
    mm = bootstrap_ci([r["match_content"] - r["match_blank"] for r in records])
    print(f"  content-blank NLL {d.mean:+.3f} [{d.low:+.3f},{d.high:+.3f}]  Match {mm.mean:+.3f} [{mm.low:+.3f},{mm.high:+.3f}]")
    print(f"  closed Match {stt.fmean(base[x]['match_closed_book'] for x in lines):.3f} "
          f"full Match {stt.fmean(base[x]['match_full'] for x in lines):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "train":
        train(args[0], Path(args[1]), int(args[2]), int(args[3]) if len(args) > 3 else 8)
    elif cmd == "eval":
        evaluate(Path(args[0]), int(args[1]), args[2], init=len(args) > 3 and args[3] == "init")
    else:
        sys.exit(__doc__)
