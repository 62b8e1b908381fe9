#!/usr/bin/env python3
"""Shared-memory wavefronts per decode load of the attention kernel, modelled
on random records (D=128, 39 kept of 128, K with the benchmark's outlier
channels c % 32 == 5 always kept, V plain; 112-byte staged stride).

For every decode load of a warp (one channel slot of every lane), the
active lanes (bit set) read a 16-bit value; the load takes as many
wavefronts as the most distinct 4-byte words that fall in one of the 32
banks.  Mappings: which channel lane (g, t) decodes at slot s.
  run:   one run of D/4 (K) or D/8 (V) channels per lane (the K decode of
         mustafar_kernels.cuh)
  quad:  neighbouring quads of 4 channels
  octet: neighbouring octets of 8 channels
(see bench/DESIGN-NOTES.md for what each measured).
Usage: python3 bank_conflicts.py [trials]"""
import random
import sys

D, KEPT, STRIDE = 128, 39, 112


def record(outliers):
    forced = [c for c in range(D) if c % 32 == 5] if outliers else []
    rest = random.sample([c for c in range(D) if c not in forced], KEPT - len(forced))
    return sorted(forced + rest)


def wavefronts(addresses):
    banks = {}
    for a in addresses:
        banks.setdefault(a // 4 % 32, set()).add(a // 4)
    return max((len(w) for w in banks.values()), default=0)


def model(channel, kind, trials):
    loads = total = 0
    for _ in range(trials):
        recs = [record(kind == 'K') for _ in range(16)]
        index = [{c: i for i, c in enumerate(r)} for r in recs]
        base = 0 if kind == 'K' else 16 * STRIDE
        # K: lane (g, t) decodes rows g and g+8, 32 slots each; V: positions
        # 2t, 2t+1, 2t+8, 2t+9, 16 slots each
        groups = [(r, 32) for r in range(2)] if kind == 'K' else [(i, 16) for i in range(4)]
        for which, slots in groups:
            for s in range(slots):
                addresses = []
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    row = g + 8 * which if kind == 'K' else 2 * t + (which & 1) + 8 * (which >> 1)
                    c = channel(s, g, t)
                    if c in index[row]:
                        addresses.append(base + row * STRIDE + 16 + 2 * index[row][c])
                total += max(1, wavefronts(addresses))
                loads += 1
    return total / loads


K_MAPS = {'run': lambda s, g, t: 32 * t + s,
          'quad': lambda s, g, t: 16 * (s // 4) + 4 * t + s % 4,
          'octet': lambda s, g, t: 32 * (s // 8) + 8 * t + s % 8}
V_MAPS = {'run': lambda s, g, t: 16 * g + s,
          'quad': lambda s, g, t: 32 * (s // 4) + 4 * g + s % 4,
          'octet': lambda s, g, t: 64 * (s // 8) + 8 * g + s % 8}

if __name__ == '__main__':
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    random.seed(1)
    for name in K_MAPS:
        print(f'{name:6s} K {model(K_MAPS[name], "K", trials):.2f}  V {model(V_MAPS[name], "V", trials):.2f}'
              ' wavefronts per decode load')
