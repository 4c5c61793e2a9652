"""Exploratory (run 21 of docs/training.md): the chunk rows replaced at EVERY layer from L up by
that layer's mean chunk state (one vector per chunk per layer, like a mean-pooled KV cache), vs
the same with blanks, on the first LIMIT NQ eval questions (gold passage only, answer NLL).

    python docs/experiments/layer_deep_probe.py LIMIT L1,L2,... [OUT.json]
"""
import json, sys, statistics as st, random, torch
from refrag_integrations.engine import RefragEngine
from refrag_integrations.evaluation.data import load_qa, nq_path
from refrag_integrations.evaluation.capacity import answer_ids, compressed_prompt
from refrag_integrations.evaluation.layer_probe import chunk_summaries, decoder_layers
torch.set_num_threads(2)
LIMIT = int(sys.argv[1]); STARTS = [int(x) for x in sys.argv[2].split(",")]
eng = RefragEngine.from_pretrained(); layers = decoder_layers(eng); N = len(layers)
exs = load_qa(nq_path("../shared/data"), "eval")[:LIMIT]
def states(passage):
    return chunk_summaries(eng, passage, range(1, N))
blank = {}
for ex in exs[:16]:
    for L, v in states(ex.passage).items(): blank.setdefault(L, []).append(v)
blank = {L: torch.cat(v).mean(0) for L, v in blank.items()}
cur = {}
def mk(L):
    def h(m, a, out):
        if L not in cur: return out
        x = out[0] if isinstance(out, tuple) else out
        a_, b_, v = cur[L]
        if x.shape[1] < b_: return out
        x = x.clone(); x[:, a_:b_] = v; return (x, *out[1:]) if isinstance(out, tuple) else x
    return h
hs_ = [layers[L-1].register_forward_hook(mk(L)) for L in range(1, N)]
R = []
for ex in exs:
    tgt = answer_ids(eng, ex.answers[0]); comp, (a, b) = compressed_prompt(eng, ex.question, ex.passage)
    with torch.no_grad():
        closed = float(eng.score([eng.prepare_rag(ex.question, [], "all").embeds], tgt)[0])
        full = float(eng.score([eng.prepare_rag(ex.question, [ex.passage], "all").embeds], tgt)[0])
    s = states(ex.passage); rec = {"closed": closed, "full": full}
    for S in STARTS:
        for name in ("content", "blank"):
            cur.clear()
            for L in range(S, N):
                cur[L] = (a, b, s[L] if name == "content" else blank[L].expand(b - a, -1))
            with torch.no_grad(): rec[f"from{S}_{name}"] = float(eng.score([comp], tgt)[0])
            cur.clear()
    R.append(rec); print(len(R), {k: round(v, 2) for k, v in rec.items()}, flush=True)
c = st.mean(r["closed"] for r in R); f = st.mean(r["full"] for r in R)
print(f"n={len(R)} closed {c:.3f} full {f:.3f}")
for k in R[0]:
    v = st.mean(r[k] for r in R); print(f"| {k} | {v:.3f} | {(c - v) / (c - f):+.2f} |")
json.dump(R, open(sys.argv[3] if len(sys.argv) > 3 else f"deep_{LIMIT}.json", "w"))
