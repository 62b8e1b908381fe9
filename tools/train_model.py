#!/usr/bin/env python3
"""Train the small byte-level model of examples/generate.c and export it.

A decoder-only transformer of Llama layout (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP, untied output head) over a 256-symbol byte vocabulary,
trained on the Python source and documentation that ships with Python itself:

  * every *.py file of the standard library (sysconfig "stdlib", without its
    site-packages / dist-packages), and
  * every *.py, *.pyi, *.txt, *.rst and *.md file of site-packages
    (sysconfig "purelib" and "platlib", and site.getsitepackages()),

files of 4 bytes to 1 MB, read in sorted path order.  A file goes to the
held-out set when md5(its path relative to its root) % 20 == 0 (5 % of the
files, never trained on); the first --heldout-bytes of the held-out text are
written to heldout.txt so the fidelity harness can run anywhere.

Outputs (into --out):
  tiny.safetensors   fp16 weights with Hugging Face Llama tensor names; the
                     settings are in the header's __metadata__
  vectors.safetensors test vectors: a prompt (I32) and the fp32 logits of the
                     exported fp16 weights at every prompt position
  loss.csv           step, tokens, seconds, lr, train loss (bits/byte), and
                     held-out bits/byte where measured
  settings.json      every setting, the data sizes and the final numbers
  heldout.txt        held-out text (never trained on)

  python3 tools/train_model.py --out /tmp/m --minutes 5          # the H200 run
  python3 tools/train_model.py --out /tmp/m --smoke              # CPU, seconds
  python3 tools/train_model.py --out examples/model \
      --export-vectors examples/model/tiny.safetensors            # CPU, seconds

--export-vectors MODEL writes only vectors.safetensors, from a trained model's
fp16 weights run in fp32 on the CPU (the committed vectors come from this).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- data ----
def text_files():
    """(root, relative path) of every training/held-out candidate, sorted."""
    import site
    paths = sysconfig.get_paths()
    stdlib = os.path.realpath(paths["stdlib"])
    pkgs = []
    for p in [paths["purelib"], paths["platlib"]] + list(site.getsitepackages()):
        p = os.path.realpath(p)
        if os.path.isdir(p) and p not in pkgs:
            pkgs.append(p)
    out = []
    roots = [(stdlib, (".py",))] + [(p, (".py", ".pyi", ".txt", ".rst", ".md")) for p in pkgs]
    for root, exts in roots:
        for d, dirs, files in os.walk(root):
            rel_d = os.path.relpath(d, root)
            if root == stdlib and rel_d.split(os.sep)[0] in ("site-packages", "dist-packages"):
                dirs[:] = []
                continue
            dirs.sort()
            for f in sorted(files):
                if f.endswith(exts):
                    out.append((root, os.path.normpath(os.path.join(rel_d, f))))
    return out


def load_corpus(max_bytes):
    train, held = [], []
    ntrain = nheld = 0
    nfiles = [0, 0]
    for root, rel in text_files():
        full = os.path.join(root, rel)
        try:
            size = os.path.getsize(full)
            if size < 4 or size > (1 << 20):
                continue
            with open(full, "rb") as fh:
                b = fh.read()
        except OSError:
            continue
        if b"\0" in b:
            continue
        is_held = int(hashlib.md5(rel.encode()).hexdigest(), 16) % 20 == 0
        if is_held:
            held.append(b + b"\n\n")
            nheld += len(b) + 2
            nfiles[1] += 1
        elif ntrain < max_bytes:
            train.append(b + b"\n\n")
            ntrain += len(b) + 2
            nfiles[0] += 1
    return b"".join(train), b"".join(held), nfiles


# --------------------------------------------------------------- model ----
class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


def rope_tables(T, D, theta, device):
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D))
    ang = torch.arange(T, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x, cos, sin):  # x [B, H, T, D]
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.hq, self.hkv, self.d = c["n_heads"], c["n_kv_heads"], c["head_dim"]
        dm = c["d_model"]
        self.q_proj = nn.Linear(dm, self.hq * self.d, bias=False)
        self.k_proj = nn.Linear(dm, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(dm, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.hq * self.d, dm, bias=False)

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.hq, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        g = self.hq // self.hkv
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c["d_model"], c["d_ff"], bias=False)
        self.up_proj = nn.Linear(c["d_model"], c["d_ff"], bias=False)
        self.down_proj = nn.Linear(c["d_ff"], c["d_model"], bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["d_model"], c["norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["d_model"], c["norm_eps"])
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab"], c["d_model"])
        self.layers = nn.ModuleList([Layer(c) for _ in range(c["n_layers"])])
        self.norm = RMSNorm(c["d_model"], c["norm_eps"])


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.model = Inner(c)
        self.lm_head = nn.Linear(c["d_model"], c["vocab"], bias=False)
        for n, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02
                if n.endswith("o_proj.weight") or n.endswith("down_proj.weight"):
                    std = 0.02 / math.sqrt(2 * c["n_layers"])
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        T = idx.shape[1]
        cos, sin = rope_tables(T, self.c["head_dim"], self.c["rope_theta"], idx.device)
        x = self.model.embed_tokens(idx)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


CONFIG = dict(vocab=256, d_model=384, n_layers=6, n_heads=8, n_kv_heads=2, head_dim=64,
              d_ff=960, norm_eps=1e-5, rope_theta=10000.0, context=2048)


def export(model, path, meta):
    from safetensors.torch import save_file
    sd = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, path, metadata={k: str(v) for k, v in meta.items()})


TEST_PROMPT = b"import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Parse the arguments"


def load_model(path, device="cpu"):
    """A Model in fp32 from a tiny.safetensors (fp16 weights, settings in the metadata)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    c = dict(CONFIG)
    for k in c:
        c[k] = int(meta[k]) if isinstance(CONFIG[k], int) else float(meta[k])
    model = Model(c).to(device)
    model.load_state_dict(sd)
    model.eval()
    return model


def write_vectors(ref, path, device="cpu"):
    """The test prompt (I32) and the fp32 logits of ref (dense attention) at every position."""
    from safetensors.torch import save_file
    pt = torch.tensor(list(TEST_PROMPT), dtype=torch.int32)
    with torch.no_grad():
        logits = ref(pt[None].long().to(device))[0].float().cpu()
    save_file({"prompt": pt.contiguous(), "logits": logits.contiguous()}, path,
              metadata={"what": "fp32 logits of the fp16 weights of tiny.safetensors, dense attention"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--context", type=int, default=CONFIG["context"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-train-bytes", type=int, default=400 << 20)
    ap.add_argument("--heldout-bytes", type=int, default=768 << 10)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--deadline", type=float, default=0,
                    help="seconds since start by which training must stop (leaves 45 s to export); 0: none")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check: tiny data, a few steps, same model and exports")
    ap.add_argument("--export-vectors", metavar="MODEL",
                    help="only write OUT/vectors.safetensors from MODEL's weights (CPU, fp32)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.export_vectors:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        write_vectors(load_model(a.export_vectors), os.path.join(a.out, "vectors.safetensors"))
        print(f"wrote {os.path.join(a.out, 'vectors.safetensors')} ({len(TEST_PROMPT)} positions)")
        return
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    dev = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    if a.smoke:
        a.max_train_bytes, a.batch, a.context, a.compile = min(a.max_train_bytes, 4 << 20), 2, 256, 0
    c = dict(CONFIG, context=a.context)

    t0 = time.time()
    train_b, held_b, nfiles = load_corpus(a.max_train_bytes)
    print(f"data: {len(train_b)/1e6:.1f} MB train ({nfiles[0]} files), "
          f"{len(held_b)/1e6:.1f} MB held out ({nfiles[1]} files), {time.time()-t0:.1f} s", flush=True)
    held_txt = held_b[: a.heldout_bytes]
    with open(os.path.join(a.out, "heldout.txt"), "wb") as fh:
        fh.write(held_txt)
    train = torch.from_numpy(np.frombuffer(train_b, dtype=np.uint8).copy()).to(dev)
    held = torch.from_numpy(np.frombuffer(held_b, dtype=np.uint8).copy()).to(dev)
    T = a.context
    # fixed held-out eval batch: 16 windows (4 in smoke) spread over the held-out text
    nev = 4 if a.smoke else 16
    ev_starts = torch.linspace(0, len(held) - T - 2, nev).long().to(dev)
    ar = torch.arange(T + 1, device=dev)
    ev = held[ev_starts[:, None] + ar[None, :]].long()

    model = Model(c).to(dev)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model: {nparams/1e6:.2f} M parameters, {c}", flush=True)
    decay = [p for p in model.parameters() if p.dim() == 2]
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": nodecay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=(dev == "cuda"))
    fwd = torch.compile(model) if a.compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)

    def loss_of(m, xy):
        with amp:
            logits = m(xy[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, c["vocab"]), xy[:, 1:].reshape(-1))

    @torch.no_grad()
    def held_bpb():  # eager: a compiled call at another batch size would recompile
        model.eval()
        tot = 0.0
        for i in range(0, nev, 4):
            tot += loss_of(model, ev[i:i + 4]).item() * min(4, nev - i)
        model.train()
        return tot / nev / math.log(2)

    budget = 20.0 if a.smoke else a.minutes * 60.0
    warm_steps = 100
    rows = []
    step, tokens = 0, 0
    t_start = None
    gen = torch.Generator(device=dev)
    gen.manual_seed(a.seed)
    while True:
        # lr: linear warmup over 100 steps, then cosine to 10 % over the time budget
        frac = 0.0 if t_start is None else min(1.0, (time.time() - t_start) / budget)
        lr = a.lr * min(1.0, (step + 1) / warm_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train) - T - 1, (a.batch,), device=dev, generator=gen)
        xy = train[starts[:, None] + ar[None, :]].long()
        try:
            loss = loss_of(fwd, xy)
        except Exception as e:  # torch.compile unavailable: train eagerly
            if fwd is model:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training eagerly", flush=True)
            fwd = model
            a.compile = 0
            loss = loss_of(fwd, xy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += a.batch * T
        if t_start is None:  # the clock starts after the first (compiling) step
            if dev == "cuda":
                torch.cuda.synchronize()
            t_start = time.time()
            print(f"first step (compile) done at {t_start - t0:.1f} s", flush=True)
        done = time.time() - t_start >= budget or (a.deadline and time.time() - t0 >= a.deadline - 45)
        if step % 10 == 0 or done:
            row = dict(step=step, tokens=tokens, seconds=round(time.time() - t_start, 2), lr=lr,
                       train_bpb=loss.item() / math.log(2), heldout_bpb="")
            if step % a.eval_every == 0 or done:
                row["heldout_bpb"] = held_bpb()
                print(f"step {step} {row['seconds']:.0f}s train {row['train_bpb']:.3f} "
                      f"held-out {row['heldout_bpb']:.3f} bits/byte", flush=True)
            rows.append(row)
        if done:
            break
    train_s = time.time() - t_start

    with open(os.path.join(a.out, "loss.csv"), "w") as fh:
        fh.write("step,tokens,seconds,lr,train_bpb,heldout_bpb\n")
        for r in rows:
            hb = "" if r["heldout_bpb"] == "" else f"{r['heldout_bpb']:.4f}"
            fh.write(f"{r['step']},{r['tokens']},{r['seconds']},{r['lr']:.3e},{r['train_bpb']:.4f},{hb}\n")

    # Export fp16 weights, then measure the exported model itself in fp32.
    meta = dict(format="mustafar-generate-llama", vocab=c["vocab"], d_model=c["d_model"],
                n_layers=c["n_layers"], n_heads=c["n_heads"], n_kv_heads=c["n_kv_heads"],
                head_dim=c["head_dim"], d_ff=c["d_ff"], norm_eps=c["norm_eps"],
                rope_theta=c["rope_theta"], context=c["context"])
    export(model, os.path.join(a.out, "tiny.safetensors"), meta)
    ref = Model(c).to(dev)
    ref.load_state_dict({k: v.to(torch.float16).float() for k, v in model.state_dict().items()})
    ref.eval()
    with torch.no_grad():
        tot = 0.0
        for i in range(nev):
            lg = ref(ev[i:i + 1, :-1]).float()
            tot += F.cross_entropy(lg[0], ev[i, 1:]).item()
        final_fp16 = tot / nev / math.log(2)
    write_vectors(ref, os.path.join(a.out, "vectors.safetensors"), dev)
    settings = dict(model=c, parameters=nparams, batch=a.batch, lr=a.lr, betas=[0.9, 0.95],
                    weight_decay=0.1, grad_clip=1.0, warmup_steps=warm_steps,
                    schedule="linear warmup, cosine to 10 % over the time budget",
                    precision="bf16 autocast, fp32 master weights, AdamW", compiled=bool(a.compile),
                    seed=a.seed, steps=step, tokens=tokens, train_seconds=round(train_s, 1),
                    budget_seconds=budget, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                    torch=torch.__version__, python=sys.version.split()[0],
                    data=dict(train_bytes=len(train_b), train_files=nfiles[0], heldout_bytes=len(held_b),
                              heldout_files=nfiles[1], heldout_txt_bytes=len(held_txt),
                              sources="stdlib *.py (no site-packages); site-packages *.py *.pyi *.txt "
                                      "*.rst *.md; files 4 B..1 MB without NUL bytes; held out: "
                                      "md5(relative path) % 20 == 0"),
                    final=dict(train_bpb=rows[-1]["train_bpb"], heldout_bpb=rows[-1]["heldout_bpb"],
                               heldout_bpb_fp16_export_fp32=final_fp16))
    with open(os.path.join(a.out, "settings.json"), "w") as fh:
        json.dump(settings, fh, indent=1)
    print(f"SUMMARY: {nparams/1e6:.2f} M params, {step} steps, {tokens/1e6:.0f} M tokens in "
          f"{train_s:.0f} s; held-out {final_fp16:.3f} bits/byte (fp16 export, fp32 math)")


if __name__ == "__main__":
    main()
