#!/usr/bin/env python3
"""Per-fault breakdown of a `shoal-loadtest faults` run kept with --keep-dir.
usage: faults_breakdown.py RUN.err KEEPDIR [--slow MS]

RUN.err is the stderr of `shoal-loadtest faults --keep-dir KEEPDIR` run with
RUST_LOG=info,openraft=info: its per-fault notes carry the wall-clock times of each fault, its
healing and each node's first acknowledged write ("fault at ..., healed at ... (unix s); served
at node1=..."). The nodes' logs (KEEPDIR/nodeN.log) carry their `shoal::failover` trace and the
transport's "closing a connection whose peer went silent" lines. For every fault this prints,
per node, when it served again and what it saw before: the leader it learned (and when), its
campaigns, the silent connections it closed. Times are milliseconds from the fault for nodes it
did not hit and from the healing for nodes it hit. --slow MS prints only the faults where some
node took longer than MS (default: all)."""
import datetime
import glob
import os
import re
import statistics
import sys

args = sys.argv[1:]
slow = None
if '--slow' in args:
    i = args.index('--slow')
    slow = float(args[i + 1])
    del args[i:i + 2]
err, keep = args
ansi = re.compile(r'(?:\x1b|\\x1b)\[[0-9;]*m')
note = re.compile(
    r'\[faults\]\s+(\d+) (.+?) \(([^)]*)\), held ([\d.]+) s: .*?fault at ([\d.]+), healed at '
    r'([\d.]+) \(unix s\); served at (.*)$')
faults = []
for line in open(err, errors='replace'):
    m = note.search(ansi.sub('', line.rstrip('\n')))
    if not m:
        continue
    served = {}
    for kv in m.group(7).split():
        n, t = kv.split('=')
        served[n] = float(t)
    faults.append(dict(trial=int(m.group(1)), kind=m.group(2), hit=m.group(3).split('+'),
                       held=float(m.group(4)), fault=float(m.group(5)), healed=float(m.group(6)),
                       served=served))
if not faults:
    sys.exit(f'no fault notes with wall-clock times in {err}')

kv = re.compile(r'(\w+)=("[^"]*"|\S+)')
events = {}  # node -> [(t, kind, fields)]
ids = {}  # raft id -> node name (from each node's own "leader ... is_me=true")
for path in glob.glob(os.path.join(keep, 'node*.log')):
    node = os.path.basename(path)[:-4]
    evs = events.setdefault(node, [])
    for line in open(path, errors='replace'):
        line = ansi.sub('', line)
        ts = re.match(r'(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z', line)
        if not ts:
            continue
        t = datetime.datetime.fromisoformat(ts.group(1)).replace(
            tzinfo=datetime.timezone.utc).timestamp()
        fields = {k: v.strip('"') for k, v in kv.findall(line)}
        if 'shoal::failover' in line and 'event' in fields:
            if 'unix_us' in fields:
                t = int(fields['unix_us']) / 1e6
            evs.append((t, fields['event'], fields))
            if fields['event'] == 'leader' and fields.get('is_me') == 'true':
                ids[fields['leader']] = node
        elif 'peer went silent' in line:
            evs.append((t, 'silent', fields))
        elif 'election timeout expired' in line:
            evs.append((t, 'timer', fields))
        elif 'starting' in line and 'shoal' in line and t:
            pass
for evs in events.values():
    evs.sort(key=lambda e: e[0])


def ms(x):
    return '-' if x is None else f'{x * 1000:.0f}'


rows = []
for i, f in enumerate(faults):
    end = faults[i + 1]['fault'] if i + 1 < len(faults) else f['healed'] + 30
    per = {}
    for node, t_served in sorted(f['served'].items()):
        hit = node in f['hit']
        since = f['healed'] if hit else f['fault']
        evs = [e for e in events.get(node, []) if f['fault'] - 0.05 <= e[0] < end]
        learned = [e for e in evs if e[1] == 'leader' and e[0] >= since - 0.05]
        first_leader = learned[0] if learned else None
        per[node] = dict(
            hit=hit, took=t_served - since,
            leader_at=(first_leader[0] - since) if first_leader else None,
            leader=ids.get(first_leader[2].get('leader'), first_leader[2].get('leader'))
            if first_leader else None,
            term=first_leader[2].get('term') if first_leader else None,
            campaigns=sum(1 for e in evs if e[1] == 'campaign'),
            silent=sum(1 for e in evs if e[1] == 'silent' and e[0] <= t_served))
    worst = max(p['took'] for p in per.values())
    rows.append((f, per, worst))
    if slow is not None and worst * 1000 < slow:
        continue
    print(f"#{f['trial']} {f['kind']} ({'+'.join(f['hit'])}), held {f['held']:.1f} s, "
          f"healed at +{ms(f['healed'] - f['fault'])} ms")
    for node, p in per.items():
        print(f"   {node:<7} {'hit ' if p['hit'] else '    '} served {ms(p['took']):>6} ms  "
              f"leader {p['leader'] or '-'} (term {p['term'] or '-'}) known at "
              f"{ms(p['leader_at']):>6} ms  campaigns {p['campaigns']}  "
              f"silent connections closed {p['silent']}")

print()
print('per kind, ms: any serving / every serving (from the fault), hit nodes (from healing)')
kinds = sorted(set(f['kind'] for f in faults))
for k in kinds:
    rs = [(f, per) for f, per, _ in rows if f['kind'] == k]
    anyv = sorted(min(p['took'] for p in per.values() if not p['hit']) for _, per in rs
                  if any(not p['hit'] for p in per.values()))
    every = sorted(max(p['took'] for p in per.values() if not p['hit']) for _, per in rs
                   if any(not p['hit'] for p in per.values()))
    hit = sorted(max(p['took'] for p in per.values() if p['hit']) for _, per in rs
                 if any(p['hit'] for p in per.values()))

    def s(v):
        return '-' if not v else f'median {statistics.median(v) * 1000:.0f} max {v[-1] * 1000:.0f}'
    print(f'  {k:<22} n={len(rs):<3} any {s(anyv)};  every {s(every)};  hit {s(hit)}')
