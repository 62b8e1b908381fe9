"""Generate with a Hugging Face model (Llama, Qwen2, Mistral style) on a
Mustafar cache: the prompt is prefilled with the model's own attention, its
K/V are pruned and compressed into the cache, and every decode step appends
and attends through mustafar.h.

    make lib
    PYTHONPATH=python python3 examples/hf_generate.py --model /path/to/model \
        --k-sparsity 0.7 --v-sparsity 0.7 --prompt "The capital of France is"

--compare also generates with the model's own (dense) cache, for its text and
speed.  --model tiny builds a small random Llama instead (no download)."""
import argparse
import sys

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          LogitsProcessorList)

import mustafar
from mustafar.hf import MustafarCache, StepTimer, enable


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory, or 'tiny'")
    ap.add_argument("--prompt", default="The three most important ideas in computer science are")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k-sparsity", type=float, default=0.5)
    ap.add_argument("--v-sparsity", type=float, default=0.5)
    ap.add_argument("--dense-window", type=int, default=32)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare", action="store_true", help="also run the model's own cache")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)

    if a.model == "tiny":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                          num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=64, pad_token_id=0)
        model = LlamaForCausalLM(cfg).to(device=a.device, dtype=dtype).eval()
        tok = None
        ids = torch.randint(1, 512, (1, 32)).to(a.device)
    else:
        tok = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype,
                                                     attn_implementation="sdpa").to(a.device).eval()
        ids = tok(a.prompt, return_tensors="pt").input_ids.to(a.device)
    print("mustafar %s (%s), model %s, device %s, %s, prompt %d tokens"
          % (mustafar.version(), mustafar.library_path(), a.model, a.device, a.dtype, ids.shape[1]))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
              do_sample=False, pad_token_id=tok.eos_token_id if tok else 0)
    text = (lambda t: tok.decode(t, skip_special_tokens=True)) if tok else (lambda t: str(t.tolist()))

    runs = []
    if a.compare:
        timer = StepTimer()
        timer.start()
        out = model.generate(ids, logits_processor=LogitsProcessorList([timer]), **kw)
        runs.append(("dense (model's own cache)", out, timer, None))
    enable(model)
    cache = MustafarCache(model.config, k_sparsity=a.k_sparsity, v_sparsity=a.v_sparsity,
                          dense_window=a.dense_window, max_cache_len=ids.shape[1] + a.max_new_tokens)
    timer = StepTimer()
    timer.start()
    out = model.generate(ids, past_key_values=cache, logits_processor=LogitsProcessorList([timer]), **kw)
    runs.append(("mustafar k=%.2f v=%.2f" % (a.k_sparsity, a.v_sparsity), out, timer, cache))
    for name, out, timer, c in runs:
        print("\n== %s" % name)
        print(text(out[0, ids.shape[1]:]))
        print("prefill %.3f s, decode %.1f tokens/s" % (timer.prefill_s(), timer.decode_tokens_per_s()))
        if c is not None:
            held, dense, _ = c.kv_bytes()
            print("KV cache: %d bytes held vs %d dense (%.1f %%, %.2fx smaller)"
                  % (held, dense, 100.0 * held / dense, dense / held))
    return 0


if __name__ == "__main__":
    sys.exit(main())
