#!/usr/bin/env python3
"""Quality cost of K/V pruning on the small model of examples/model.

Teacher-forced on held-out text (examples/model/heldout.txt, never trained
on): bits per byte and top-1 agreement with the dense model, for K/V
sparsities {0.3, 0.5, 0.7, 0.8, 0.9} (K and V together and apart) and dense
windows, computed by examples/generate.c through mustafar.h's cache.

  python3 tools/fidelity.py                 short slice: context 512, one
                                            segment, K=V 0.5/0.7, windows 0/32
  python3 tools/fidelity.py --full          the grid run on the 2-core CPU
                                            machine (~25 min there): windows
                                            0/32/128; context 512, 6 segments,
                                            K=V, K only, V only; context 2048,
                                            one segment, K=V
  python3 tools/fidelity.py --full --wide   context 2048 on two segments (one
                                            from each half of the text) with
                                            K only and V only too (about 6x the
                                            CPU time of the 2048 part)
  python3 tools/fidelity.py --reference     also the float32 PyTorch reference
                                            with both keep rules (needs torch)
  python3 tools/fidelity.py --structured    also K 0.5 by 2:4 against ours in the
                                            PyTorch reference (the rule sparse
                                            tensor cores take), and K at 0.7 with
                                            at most 2 kept in every group of 4
                                            channels (capped1: c..c+3, capped8:
                                            c, c+8, c+16, c+24 of 32); whole channel
                                            pairs (pairs1: c, c+1; pairs32: c, c+32,
                                            RoPE's pairs at D=64) for K and V, K or
                                            V only; 2 of 4 in whole groups of K
                                            (groups1, groups8)
  python3 tools/fidelity.py --report-only   table and plot from saved CSVs

The PyTorch reference runs the same model (tools/train_model.py) with the
same cache semantics (a query at position i sees keys and values j <= i - W
pruned, the W newest dense) and two keep rules:
  ours     keep exactly n = D - floor(s*D) elements, the n largest |x|, ties
           to the lower channel (mustafar_prune's rule);
  authors  keep |x| >= the p-th smallest |x|, p = floor(s*D) (the Mustafar
           code): one element more than ours when there are no ties.
Its "ours" rows check the C numbers; its "authors" rows show the difference.

KV bytes per token: 2 (K, V) x layers x KV heads x record bytes, a record
being mustafar_record_bytes = 8-byte bitmap (D = 64) + 2 bytes per kept fp16
value, rounded up to 16 (dense fp16: 128 bytes per head vector).
"""
import argparse
import csv
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAYERS, KV_HEADS, D = 6, 2, 64


def pruned_count(s, d=D):
    return int(math.floor(s * d + 1e-6))   # guards float rounding as the library does


def record_bytes(s, extra=0, d=D):
    n = d - pruned_count(s, d) + extra
    return (d // 8 + 2 * n + 15) // 16 * 16


def kv_bytes(ks, vs, extra=0):
    """Bytes per token of the compressed cache, all layers and KV heads."""
    return LAYERS * KV_HEADS * (record_bytes(ks, extra) + record_bytes(vs, extra))


DENSE_BYTES = LAYERS * KV_HEADS * 2 * D * 2


# ------------------------------------------------------------ C harness ----
def run_c(gen, text, ctx, segments, grid, threads, csv_path):
    cmd = [gen, "--model", os.path.join(ROOT, "examples/model/tiny.safetensors"), "--eval", text,
           "--ctx", str(ctx), "--segments", str(segments), "--grid", grid, "--threads", str(threads),
           "--backend", "cpu", "--csv", csv_path]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def read_c(paths):
    """{(ctx, ks, vs, window): [bpb, dbpb, agree, n_runs]} averaged over equal-sized runs."""
    rows = {}
    for p in paths:
        if not os.path.exists(p):
            continue
        for r in csv.reader(open(p)):
            if not r or r[0] != "library":
                continue
            ctx, seg = int(r[1]), int(r[2])
            key = (ctx, float(r[3]), float(r[4]), int(r[5]))
            v = rows.setdefault(key, [0.0, 0.0, 0.0, 0])
            v[0] += float(r[6]) * seg; v[1] += float(r[7]) * seg; v[2] += float(r[8]) * seg; v[3] += seg
    return {k: (v[0] / v[3], v[1] / v[3], v[2] / v[3], v[3]) for k, v in rows.items()}


# ------------------------------------------------------ torch reference ----
def reference(text_path, ctx, segments, settings, out_csv):
    import torch
    sys.path.insert(0, HERE)
    from train_model import load_model, apply_rope, rope_tables
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = load_model(os.path.join(ROOT, "examples/model/tiny.safetensors"))
    c = model.c
    text = open(text_path, "rb").read()
    span = len(text) - ctx - 1
    starts = [span // (segments - 1) * s if segments > 1 else 0 for s in range(segments)]

    def top2(a, st):
        """Groups of 4 channels (c, c+st, c+2st, c+3st): their values sorted, largest first (ties: lower
        channel), and the mask of each group's 2 largest, both [..., D/(4st), st, 4]."""
        g = a.reshape(*a.shape[:-1], -1, 4, st).transpose(-1, -2)
        top = torch.sort(g, dim=-1, descending=True, stable=True)
        return top, torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top.indices[..., :2], True)

    def ungroup(m, shape):
        return m.transpose(-1, -2).reshape(shape)

    def prune(x, s, rule):  # x [..., D]
        p = pruned_count(s, x.shape[-1])
        if p == 0:
            return x
        a = x.abs()
        if rule == "2:4":  # 2 of every 4 consecutive channels, the largest
            return x * ungroup(top2(a, 1)[1], x.shape)
        if rule.startswith("pairs"):  # whole channel pairs (c, c+st), the pairs of largest a_c^2 + a_(c+st)^2
            st, d = int(rule[5:] or 1), x.shape[-1]
            e = (a * a).reshape(*a.shape[:-1], d // (2 * st), 2, st).sum(-2, keepdim=True)
            order = torch.sort(e.flatten(-3), dim=-1, descending=True, stable=True).indices
            keep = torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order[..., : (d - p + 1) // 2], True)
            return x * keep.reshape(e.shape).expand(*e.shape[:-2], 2, st).reshape(x.shape)
        if rule.startswith("groups"):  # 2 of 4 in whole groups (c, c+st, c+2st, c+3st), those whose 2 hold most
            st, d = int(rule[6:] or 1), x.shape[-1]
            top, two = top2(a, st)
            e = (top.values[..., :2] ** 2).sum(-1).flatten(-2)
            order = torch.sort(e, dim=-1, descending=True, stable=True).indices
            chosen = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, order[..., : (d - p + 1) // 2], True)
            return x * ungroup(two & chosen.reshape(*two.shape[:-1], 1), x.shape)
        if rule.startswith("capped"):  # ours, with at most 2 kept in every group of 4 channels
            beyond = ~ungroup(top2(a, int(rule[6:] or 1))[1], x.shape)   # a group's third and fourth
            a = torch.where(beyond, torch.full_like(a, -1.0), a)   # then ranked last by the rule below
        if rule == "ours" or rule.startswith("capped"):
            order = torch.sort(a, dim=-1, descending=True, stable=True).indices
            keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order[..., : x.shape[-1] - p], True)
        else:
            thr = torch.kthvalue(a, p, dim=-1, keepdim=True).values
            keep = a >= thr
        return x * keep

    @torch.no_grad()
    def logits_of(idx, ks, vs, window, rule):
        T = idx.shape[1]
        cos, sin = rope_tables(T, c["head_dim"], c["rope_theta"], "cpu")
        i = torch.arange(T)
        causal = i[None, :] <= i[:, None]
        pruned = i[None, :] <= i[:, None] - window          # key j seen pruned by query i
        x = model.model.embed_tokens(idx)
        g = c["n_heads"] // c["n_kv_heads"]
        for layer in model.model.layers:
            at = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = at.qkv(h, cos, sin)
            if "/" in rule:   # "K rule/V rule"
                k_rule, v_rule = rule.split("/")
            else:             # 2:4 and capped are K-only rules: V by ours
                k_rule, v_rule = rule, "ours" if rule == "2:4" or rule.startswith("capped") else rule
            kp, vp = prune(k, ks, k_rule), prune(v, vs, v_rule)
            k, v, kp, vp = (t.repeat_interleave(g, dim=1) for t in (k, v, kp, vp))
            scale = 1.0 / math.sqrt(c["head_dim"])
            sc = torch.where(pruned, q @ kp.transpose(-1, -2), q @ k.transpose(-1, -2)) * scale
            pr = torch.softmax(sc.masked_fill(~causal, float("-inf")), dim=-1)
            y = (pr * pruned) @ vp + (pr * ~pruned) @ v
            x = x + at.o_proj(y.transpose(1, 2).reshape(1, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(model.model.norm(x))[0]

    segs = [torch.tensor(list(text[s: s + ctx + 1]), dtype=torch.long) for s in starts]
    dense_arg = []
    with open(out_csv, "w") as fh:
        for (ks, vs, window, rule) in [(0.0, 0.0, 0, "ours")] + settings:
            nll, agree = 0.0, 0
            for si, seg in enumerate(segs):
                lg = logits_of(seg[None, :-1], ks, vs, window, rule)
                nll += torch.nn.functional.cross_entropy(lg, seg[1:], reduction="sum").item()
                am = lg.argmax(-1)
                if len(dense_arg) < len(segs):
                    dense_arg.append(am)
                agree += (am == dense_arg[si]).sum().item()
            n = ctx * len(segs)
            bpb = nll / n / math.log(2)
            if ks == 0 and vs == 0:
                dense_bpb = bpb
            extra = 1 if rule == "authors" else 0
            fh.write(f"reference,{rule},{ctx},{len(segs)},{ks},{vs},{window},{bpb:.5f},{bpb - dense_bpb:.5f},"
                     f"{agree / n:.5f},{kv_bytes(ks, vs, extra) if ks or vs else DENSE_BYTES}\n")
            print(f"reference {rule:7s} ctx {ctx} K {ks} V {vs} W {window}: {bpb:.4f} bits/byte "
                  f"({bpb - dense_bpb:+.4f}), top-1 {100 * agree / n:.2f} %", flush=True)


def read_ref(path):
    out = {}
    if os.path.exists(path):
        for r in csv.reader(open(path)):
            if r and r[0] == "reference":
                out[(r[1], int(r[2]), float(r[4]), float(r[5]), int(r[6]))] = (
                    float(r[7]), float(r[8]), float(r[9]), int(r[10]))
    return out


# ---------------------------------------------------------------- report ----
def report(c_rows, ref_rows, md_path, png_path):
    ctxs = sorted({k[0] for k in c_rows})
    keys = sorted({k[1:] for k in c_rows}, key=lambda k: (k[2], k[0] == 0 and k[1] == 0,
                                                          not (k[0] == k[1]), k[0] == 0, k[0], k[1]))
    keys = [k for k in keys if k == (0.0, 0.0, 0)] + [k for k in keys if k != (0.0, 0.0, 0)]
    head = "| K s | V s | window | KV B/token | % dense |" + "".join(
        f" bits/byte @{c} | Δ @{c} | top-1 @{c} |" for c in ctxs)
    lines = [head, "|" + "---|" * (5 + 3 * len(ctxs))]
    for ks, vs, w in keys:
        b = DENSE_BYTES if ks == 0 and vs == 0 else kv_bytes(ks, vs)
        cells = f"| {ks:.1f} | {vs:.1f} | {w} | {b} | {100 * b / DENSE_BYTES:.1f} |"
        for c in ctxs:
            r = c_rows.get((c, ks, vs, w))
            cells += (f" {r[0]:.4f} | {r[1]:+.4f} | {100 * r[2]:.1f} % |" if r else " | | |")
        lines.append(cells)
    if ref_rows:
        lines += ["", "Keep rules side by side (float32 PyTorch reference, same model and cache semantics):", "",
                  "| rule | ctx | K s | V s | window | KV B/token | bits/byte | Δ | top-1 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (rule, c, ks, vs, w), r in sorted(ref_rows.items(), key=lambda kv: (kv[0][1], kv[0][4], kv[0][2],
                                                                                kv[0][0] != "ours")):
            lines.append(f"| {rule} | {c} | {ks:.1f} | {vs:.1f} | {w} | {r[3]} | {r[0]:.4f} | {r[1]:+.4f} | "
                         f"{100 * r[2]:.1f} % |")
    text = "\n".join(lines)
    print(text)
    if md_path:
        open(md_path, "w").write(text + "\n")
    if not png_path:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    ctxs = sorted(set(ctxs) | {k[1] for k in ref_rows})
    fig, axes = plt.subplots(1, len(ctxs), figsize=(6.2 * len(ctxs), 4.6), squeeze=False)
    colors = {0: "tab:red", 32: "tab:blue", 128: "tab:green"}
    for ax, c in zip(axes[0], ctxs):
        for w in sorted({k[3] for k in c_rows if k[0] == c}):
            for kind, mk, ls in (("K=V", "o", "-"), ("K only", "^", ":"), ("V only", "s", "--")):
                pts = []
                for (cc, ks, vs, ww), r in c_rows.items():
                    if cc != c or ww != w or (ks == 0 and vs == 0):
                        continue
                    if (kind == "K=V" and ks == vs) or (kind == "K only" and vs == 0) or \
                       (kind == "V only" and ks == 0):
                        pts.append((100 * kv_bytes(ks, vs) / DENSE_BYTES, r[1]))
                if pts:
                    pts.sort()
                    ax.plot([p[0] for p in pts], [max(p[1], 1e-4) for p in pts], marker=mk, ls=ls,
                            color=colors.get(w, "gray"), label=f"{kind}, window {w}", ms=5)
        if not any(k[0] == c for k in c_rows):   # no C run at this context: the reference's own rule
            for w in sorted({k[4] for k in ref_rows if k[1] == c}):
                pts = sorted((100 * r[3] / DENSE_BYTES, r[1]) for (rule, cc, ks, vs, ww), r in ref_rows.items()
                             if rule == "ours" and cc == c and ww == w and ks)
                ax.plot([p[0] for p in pts], [max(p[1], 1e-4) for p in pts], marker="o", ls="-",
                        color=colors.get(w, "gray"), label=f"ours (PyTorch reference), K=V, window {w}", ms=5)
        for (rule, cc, ks, vs, w), r in ref_rows.items():
            if cc == c and rule == "authors" and ks:
                ax.plot([100 * r[3] / DENSE_BYTES], [max(r[1], 1e-4)], marker="*", ms=11, ls="none",
                        color=colors.get(w, "gray"), mfc="none",
                        label=f"authors' rule, K=V, window {w}" if ks == 0.5 else None)
        ax.set_yscale("log")
        ax.set_xlabel("KV cache bytes per token, % of dense fp16 (records only)")
        ax.set_ylabel("bits/byte above the dense model (log)")
        ax.set_title(f"context {c}, teacher-forced, held-out text")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("mustafar.h on a 9.8 M-parameter byte-level model (6 layers, Hkv=2, D=64)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"plot: {png_path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full grid (tens of CPU minutes)")
    ap.add_argument("--reference", action="store_true", help="PyTorch reference with both keep rules")
    ap.add_argument("--wide", action="store_true", help="with --full: all of the grid at context 2048")
    ap.add_argument("--structured", action="store_true",
                    help="PyTorch reference: K 0.5 by 2:4 (2 of every 4 channels); at 0.7 K capped at 2 of 4, "
                         "whole channel pairs and 2 of 4 in whole groups; against ours")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--generate", default=os.path.join(ROOT, "build/generate"))
    ap.add_argument("--dir", default=os.path.join(ROOT, "build/fidelity"), help="CSVs and text slices")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--md", help="write the table here (markdown)")
    ap.add_argument("--png", help="write the plot here")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    held = os.path.join(ROOT, "examples/model/heldout.txt")
    d = lambda n: os.path.join(a.dir, n)
    # the 2048 context runs one segment from each half of the held-out text
    # (two runs, so a partial grid still leaves complete results behind)
    data = open(held, "rb").read()
    half = len(data) // 2
    open(d("half_a.txt"), "wb").write(data[:half])
    open(d("half_b.txt"), "wb").write(data[half:])
    c_csv = [d("c512.csv"), d("c2048a.csv")] + ([d("c2048b.csv")] if a.wide else []) if a.full \
        else [d("short.csv")]
    if a.report_only:
        c_csv = [p for p in [d("c512.csv"), d("c2048a.csv"), d("c2048b.csv")] if os.path.exists(p)] or \
                [d("short.csv")]
    elif a.full:
        run_c(a.generate, held, 512, 6, "full", a.threads, c_csv[0])
        run_c(a.generate, d("half_a.txt"), 2048, 1, "full" if a.wide else "kv", a.threads, c_csv[1])
        if a.wide:
            run_c(a.generate, d("half_b.txt"), 2048, 1, "full", a.threads, c_csv[2])
    else:
        run_c(a.generate, held, 512, 1, "quick", a.threads, c_csv[0])
    ref_csv = d("reference.csv")
    if a.reference:
        sets = [(s, s, w, rule) for w in (0, 32) for s in (0.5, 0.7, 0.9) for rule in ("ours", "authors")]
        reference(held, 512, 6 if a.full else 1, sets, ref_csv)
    st_csv = d("structured.csv")
    if a.structured:
        sets = [(0.5, vs, w, rule) for w in (0, 32) for vs in (0.5, 0.7) for rule in ("ours", "2:4")]
        sets += [(0.7, 0.7, w, rule) for w in (0, 32) for rule in ("ours", "capped1", "capped8")]
        sets += [(0.7, 0.7, w, rule) for w in (0, 32)
                 for rule in ("pairs1", "pairs32", "pairs32/ours", "ours/pairs1", "groups1/ours", "groups8/ours")]
        reference(held, 512, 6, sets, st_csv)
    refs = read_ref(ref_csv) if (a.reference or a.report_only) else {}
    if a.structured or a.report_only:
        refs.update(read_ref(st_csv))
    report(read_c(c_csv), refs, a.md, a.png)


if __name__ == "__main__":
    main()
