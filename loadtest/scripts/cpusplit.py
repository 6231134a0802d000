#!/usr/bin/env python3
"""cpusplit.py SAMPLES.jsonl: per phase (shoal cluster alive / etcd cluster alive), steady-state
CPU used by each kind of process (cores), trimmed by TRIM s at both ends of the phase."""
import sys, json
TRIM = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
S = [json.loads(l) for l in open(sys.argv[1])]
def phases(kind):
    out, cur = [], None
    for s in S:
        alive = any(c == kind for _, c, _ in s['p'])
        if alive and cur is None: cur = [s['t'], s['t']]
        elif alive: cur[1] = s['t']
        elif cur is not None: out.append(cur); cur = None
    if cur: out.append(cur)
    return [p for p in out if p[1] - p[0] > 2 * TRIM + 2]
def at(t):
    return min(S, key=lambda s: abs(s['t'] - t))
for kind in ('shoal', 'etcd'):
    for a, b in phases(kind):
        s0, s1 = at(a + TRIM), at(b - TRIM)
        dt = s1['t'] - s0['t']
        c0 = {(p, c): v for p, c, v in s0['p']}
        use = {}
        for p, c, v in s1['p']:
            if (p, c) in c0:
                use[c] = use.get(c, 0) + (v - c0[(p, c)]) / dt
        tot0, tot1 = s0['cpu'], s1['cpu']
        busy = (sum(tot1) - sum(tot0)) - ((tot1[3] + tot1[4]) - (tot0[3] + tot0[4]))
        allc = (sum(tot1) - sum(tot0))
        print(json.dumps({'phase': kind, 'start': round(a, 1), 'secs': round(dt, 1),
              'cores': {k: round(v, 3) for k, v in use.items()},
              'machine_busy_frac': round(busy / allc, 3) if allc else None,
              'niced_frac': round((tot1[1] - tot0[1]) / allc, 3) if allc else None,
              'load': [s0['load'], s1['load']]}))
