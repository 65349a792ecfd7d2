"""Compile + per-token mask time of llguidance, xgrammar, outlines-core on the bundled tokenizer."""
import time, json, statistics, sys
import numpy as np, sentencepiece as spm
path = sys.argv[1] if len(sys.argv) > 1 else "/work/wt-24/openelm_mlx/bundled/openelm-tiny-kjv/tokenizer.model"
sp = spm.SentencePieceProcessor(model_file=path)
n = sp.get_piece_size()
toks=[]
for i in range(n):
    p = sp.id_to_piece(i)
    if sp.is_byte(i): toks.append(bytes([int(p[3:5],16)]))
    elif sp.is_control(i) or sp.is_unknown(i): toks.append(b"\xff"+p.encode())
    else: toks.append(p.replace("\u2581"," ").encode())
schema = {"type":"object","properties":{"name":{"type":"string","maxLength":20},"age":{"type":"integer","minimum":0,"maximum":120},"tags":{"type":"array","items":{"enum":["alpha","beta","gamma"]},"minItems":1,"maxItems":3}, "score":{"type":"number"}},"required":["name","age","tags","score"],"additionalProperties":False}
target = json.dumps({"name":"Aaron the priest","age":33,"tags":["alpha","gamma"],"score":1.5}, separators=(",",":"))
def enc(s):
    ids = sp.encode(s)
    if ids and sp.id_to_piece(ids[0]) == "\u2581": ids = ids[1:]
    elif ids and sp.id_to_piece(ids[0]).startswith("\u2581"): ids = [sp.piece_to_id(sp.id_to_piece(ids[0])[1:])] + ids[1:]
    if b"".join(toks[i] for i in ids) != s.encode(): ids = [3 + b for b in s.encode()]
    return ids
walk = enc(target) + [2]
print("tokens in walk", len(walk))
def med(xs): return statistics.median(xs) * 1e6

# llguidance
import llguidance as llg
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
class G:
    eos_token_id=2; bos_token_id=1; tokens=toks; special_token_ids=[0,1,2]
    def __call__(self, s): return enc(s.decode() if isinstance(s, bytes) else s)
t0=time.perf_counter(); tok = llg.LLTokenizer(llg.TokenizerWrapper(G())); tb=time.perf_counter()-t0
t0=time.perf_counter(); m = llg.LLMatcher(tok, llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})); tc=time.perf_counter()-t0
bm = allocate_token_bitmask(1, n); ts=[]
for t in walk:
    t0=time.perf_counter(); fill_next_token_bitmask(m, bm); ts.append(time.perf_counter()-t0)
    assert m.consume_token(t), m.get_error()
print(f"llguidance {llg.__version__}: tokenizer {tb*1e3:.1f} ms, compile {tc*1e3:.2f} ms, mask median {med(ts):.0f} us max {max(ts)*1e6:.0f} us")

# xgrammar
import xgrammar as xgr
t0=time.perf_counter(); info = xgr.TokenizerInfo([sp.id_to_piece(i) for i in range(n)], xgr.VocabType.BYTE_FALLBACK, stop_token_ids=[2], add_prefix_space=False); comp = xgr.GrammarCompiler(info, max_threads=1); tb=time.perf_counter()-t0
t0=time.perf_counter(); cg = comp.compile_json_schema(json.dumps(schema), any_whitespace=False); tc=time.perf_counter()-t0
mm = xgr.GrammarMatcher(cg); bm2 = xgr.allocate_token_bitmask(1, n); ts=[]
rng = np.random.default_rng(0)
for _ in range(60):
    t0=time.perf_counter(); mm.fill_next_token_bitmask(bm2); ts.append(time.perf_counter()-t0)
    bits = np.unpackbits(bm2[0].numpy().view(np.uint8), bitorder="little")[:n].astype(bool)
    t = int(rng.choice(np.flatnonzero(bits)))
    assert mm.accept_token(t)
    if mm.is_terminated(): break
print(f"xgrammar {xgr.__version__ if hasattr(xgr,'__version__') else ''}: tokenizer {tb*1e3:.1f} ms, compile {tc*1e3:.2f} ms, mask median {med(ts):.0f} us max {max(ts)*1e6:.0f} us")

# outlines-core
import outlines_core as oc
from outlines_core.json_schema import build_regex_from_schema
vocab = {}
for i in range(3, n):
    vocab.setdefault(toks[i], []).append(i)
t0=time.perf_counter(); V = oc.Vocabulary(2, {k: v for k, v in vocab.items()}); tb=time.perf_counter()-t0
t0=time.perf_counter(); idx = oc.Index(build_regex_from_schema(json.dumps(schema)), V); tc=time.perf_counter()-t0
guide = oc.Guide(idx); ts=[]
rng = np.random.default_rng(0)
for _ in range(60):
    t0=time.perf_counter(); allowed = guide.get_tokens(); ts.append(time.perf_counter()-t0)
    t = int(rng.choice(allowed)); guide.advance(t)
    if guide.is_finished(): break
print(f"outlines-core: vocabulary {tb*1e3:.1f} ms, compile (regex index) {tc*1e3:.1f} ms, allowed-list median {med(ts):.0f} us max {max(ts)*1e6:.0f} us")
