#!/usr/bin/env python3
"""Per-kill breakdown of a `shoal-loadtest raft` failover run kept with --keep-dir.
usage: failover_breakdown.py RUN.err KEEPDIR

RUN.err is the stderr of `shoal-loadtest raft --target shoal --failover-trials N --keep-dir
KEEPDIR` run with RUST_LOG=info,openraft=info (the kill times come from its notes, the rest
from the nodes' logs: openraft's election lines and Shoal's `shoal::failover` events)."""
import re, sys, glob, os, datetime, statistics
err, keep = sys.argv[1], sys.argv[2]
ansi = re.compile(r'(?:\x1b|\\x1b)\[[0-9;]*m')
kills = []
txt = open(err).read()
for m in re.finditer(r'failover (\d+): killed (\S+) at ([\d.]+) \(unix s\), writing through (\S+)\n\[raft\] shoal failover \d+: write after ([\d.]+)(ms|s)', txt):
    took = float(m.group(5)) * (1 if m.group(6) == 'ms' else 1000)
    kills.append(dict(trial=int(m.group(1)), victim=m.group(2), k=float(m.group(3)), via=m.group(4), took=took))
events = []  # (t, node, kind, extra)
for path in glob.glob(os.path.join(keep, '**', '*.log'), recursive=True):
    base = os.path.basename(path)
    mm = re.match(r'(?:shoal-)?(node\d+)(?:-restart)?\.log$', base)
    if not mm:
        continue
    node = mm.group(1)
    for line in open(path, errors='replace'):
        line = ansi.sub('', line)
        ts = re.match(r'(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z', line)
        if not ts:
            continue
        t = datetime.datetime.fromisoformat(ts.group(1)).replace(tzinfo=datetime.timezone.utc).timestamp()
        if 'election timeout expired' in line:
            events.append((t, node, 'timer', None))
        elif 'trigger election' in line:
            events.append((t, node, 'elect', None))
        elif 'trigger pre-vote' in line:
            events.append((t, node, 'prevote', None))
        elif 'becomes leader' in line:
            events.append((t, node, 'leader', None))
        elif 'event="leader"' in line or 'event=leader' in line:
            la = re.search(r'last_append_us=(\d+)', line)
            events.append((t, node, 'known', int(la.group(1)) / 1e6 if la else None))
        elif 'event="campaign"' in line or 'event=campaign' in line or 'event="voted"' in line or 'event=voted' in line:
            la = re.search(r'last_append_us=(\d+)', line)
            events.append((t, node, 'votechg', int(la.group(1)) / 1e6 if la else None))
            if 'campaign' in line:
                events.append((t, node, 'campaign', None))
events.sort()
rows = []
for i, k in enumerate(kills):
    end = kills[i + 1]['k'] if i + 1 < len(kills) else k['k'] + 10
    ev = [e for e in events if k['k'] - 0.3 <= e[0] < end and e[1] != k['victim']]
    ack = k['k'] + k['took'] / 1000
    ev = [e for e in ev if e[0] <= ack + 0.2]
    first_timer = min([e[0] for e in ev if e[2] in ('timer',)], default=None)
    elects = [e for e in ev if e[2] == 'campaign' and e[0] <= ack] or [e for e in ev if e[2] == 'elect' and e[0] <= ack]
    leader = min([e[0] for e in ev if e[2] == 'leader' and e[0] >= k['k']], default=None)
    lastapp = max([e[3] for e in ev if e[2] == 'votechg' and e[3] and e[3] < k['k'] + 0.001], default=None)
    via_known = min([e[0] for e in ev if e[2] == 'known' and e[1] == k['via'] and e[0] >= k['k']], default=None)
    r = dict(trial=k['trial'], took=k['took'],
             hb=(k['k'] - lastapp) * 1000 if lastapp and lastapp < k['k'] + 0.001 else None,
             timer=(first_timer - k['k']) * 1000 if first_timer else None,
             rounds=len(elects),
             leader=(leader - k['k']) * 1000 if leader else None,
             via_known=(via_known - k['k']) * 1000 if via_known else None)
    rows.append(r)
def f(x):
    return '-' if x is None else (f'{x:.0f}' if isinstance(x, float) else str(x))
print('trial took_ms lastAE_before_kill_ms first_timer_ms elections leader_ms via_knows_ms')
for r in rows:
    print(r['trial'], f(r['took']), f(r['hb']), f(r['timer']), r['rounds'], f(r['leader']), f(r['via_known']))
def stat(key, rs=rows):
    v = sorted(r[key] for r in rs if r[key] is not None)
    if not v:
        return '-'
    return f'p50 {v[len(v)//2]:.0f} p90 {v[int(len(v)*0.9)]:.0f} max {v[-1]:.0f} (n={len(v)})'
print()
for key in ('took', 'hb', 'timer', 'leader', 'via_known'):
    print(key, stat(key))
multi = [r for r in rows if r['rounds'] > 1]
print('trials with more than one election:', len(multi), 'of', len(rows))
for n in sorted(set(r['rounds'] for r in rows)):
    rs = [r for r in rows if r['rounds'] == n]
    print(f'  {n} elections: {len(rs)} trials, took {stat("took", rs)}')
post = sorted(r['took'] - r['leader'] for r in rows if r['leader'] is not None)
if post:
    print('leader->ack p50 %.0f p90 %.0f max %.0f' % (post[len(post)//2], post[int(len(post)*0.9)], post[-1]))
el = sorted(r['leader'] - r['timer'] for r in rows if r['leader'] is not None and r['timer'] is not None)
if el:
    print('first timer->leader p50 %.0f p90 %.0f max %.0f' % (el[len(el)//2], el[int(len(el)*0.9)], el[-1]))
