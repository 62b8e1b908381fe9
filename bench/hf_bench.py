"""Decode speed and peak GPU memory of model.generate: the model's own dense
cache (attn_implementation "sdpa") against a Mustafar cache at s=0.5 and 0.7,
side by side, on random-weight models (no download):

    tiny    the test suite's config (3 layers, Hq=8, Hkv=2, D=64)
    8b      Llama-3-8B shape (32 layers, hidden 4096, Hq=32, Hkv=8, D=128,
            MLP 14336, vocab 128256)

    PYTHONPATH=python python3 bench/hf_bench.py [--models tiny,8b] [--batches 1,8]
        [--prompts 4096,32768] [--new 33] [--budget-s 240] [--csv FILE]

Decode tokens/s = batch x (new - 1) / time from the first generated token to
the last.  Peak memory = torch.cuda.max_memory_allocated (weights,
activations, and the dense cache for "dense") + the Mustafar pool and windows
(cudaMalloc'd by the library, outside PyTorch's allocator).  Configurations
left when --budget-s has passed are skipped, and listed."""
import argparse
import csv
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

import mustafar
from mustafar.hf import MustafarCache, StepTimer, enable

CONFIGS = {
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


def build(name, dtype, device):
    cfg = LlamaConfig(max_position_embeddings=65536, pad_token_id=0, **CONFIGS[name])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(prev)
    return model


def pool_bytes(cache):
    """Device bytes the library allocated for the cache (pool + windows)."""
    if cache is None or cache.mcache is None:
        return 0
    st, c = cache.mcache.stats(), cache.mcache
    rec = mustafar.record_bytes(c.head_dim, c.k_sparsity, c.dtype) + \
        mustafar.record_bytes(c.head_dim, c.v_sparsity, c.dtype)
    pool = st["pages_total"] * cache.page_size * c.num_kv_heads * c.num_layers * rec
    win = len(cache.seq_ids) * c.dense_window * c.num_kv_heads * c.num_layers * c.head_dim * 2 * 2
    return pool + win


def run(model, batch, prompt, new, s):
    cuda = model.device.type == "cuda"
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=model.device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
              do_sample=False, pad_token_id=0)
    cache = None
    if s is None:
        model.set_attn_implementation("sdpa")
    else:
        enable(model)
        cache = MustafarCache(model.config, k_sparsity=s, v_sparsity=s, dense_window=32,
                              max_cache_len=prompt + new)
        kw["past_key_values"] = cache
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(batch)
    timer.start()
    with torch.inference_mode():
        model.generate(ids, logits_processor=LogitsProcessorList([timer]), **kw)
    peak = (torch.cuda.max_memory_allocated() if cuda else 0) + pool_bytes(cache)
    kv = cache.kv_bytes()[0] / cache.kv_bytes()[1] if cache is not None else 1.0
    if cache is not None:
        cache.close()
    model.set_attn_implementation("sdpa")
    return timer.prefill_s(), timer.decode_tokens_per_s(), peak / 2**30, kv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,8b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", default="4096,32768")
    ap.add_argument("--new", type=int, default=33)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    t0 = time.time()
    dtype = getattr(torch, a.dtype)
    rows, skipped = [], []
    print("mustafar %s, %s, torch %s, %s" % (mustafar.version(), torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                                            torch.__version__, a.dtype), flush=True)
    for mname in a.models.split(","):
        model = None
        for b in map(int, a.batches.split(",")):
            for p in map(int, a.prompts.split(",")):
                for s in (None, 0.5, 0.7):
                    label = "%s B=%d prompt=%d %s" % (mname, b, p, "dense" if s is None else "s=%.1f" % s)
                    if time.time() - t0 > a.budget_s:
                        skipped.append(label)
                        continue
                    if model is None:
                        model = build(mname, dtype, a.device)
                    try:
                        pre, tps, peak, kv = run(model, b, p, a.new, s)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        pre, tps, peak, kv = float("nan"), float("nan"), float("nan"), float("nan")
                    rows.append(dict(model=mname, batch=b, prompt=p,
                                     cache="dense" if s is None else "mustafar s=%.1f" % s,
                                     prefill_s=round(pre, 3), decode_tok_s=round(tps, 1),
                                     peak_gib=round(peak, 2), kv_vs_dense=round(kv, 3)))
                    print("  %-40s prefill %7.2f s  decode %8.1f tok/s  peak %7.2f GiB  kv %.3f"
                          % (label, pre, tps, peak, kv), flush=True)
        del model
        if a.device == "cuda":
            torch.cuda.empty_cache()
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print("\n| model | B | prompt | cache | decode tok/s | x dense | peak GiB | KV vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    dense = {}
    for r in rows:
        key = (r["model"], r["batch"], r["prompt"])
        if r["cache"] == "dense":
            dense[key] = r["decode_tok_s"]
        ratio = r["decode_tok_s"] / dense[key] if dense.get(key) else float("nan")
        print("| %s | %d | %d | %s | %.1f | %.2f | %.2f | %.3f |" % (
            r["model"], r["batch"], r["prompt"], r["cache"], r["decode_tok_s"], ratio,
            r["peak_gib"], r["kv_vs_dense"]))
    if skipped:
        print("skipped (time budget %.0f s): %s" % (a.budget_s, "; ".join(skipped)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
