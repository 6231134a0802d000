#!/usr/bin/env python3
"""Samples the CPU time (utime+stime) of the shoal, etcd and shoal-loadtest processes whose
command line contains MATCH (default `shoal-loadtest`: the load generator and the clusters it
starts in its temporary directory; pass the --keep-dir path when there is one), and the whole
machine's /proc/stat, every 0.25 s, one JSON line per sample. Runs until killed.
Usage: cpuwatch.py OUT.jsonl [MATCH]; then cpusplit.py OUT.jsonl [TRIM_S]."""
import os, sys, time, json
out = open(sys.argv[1], 'w')
match = sys.argv[2] if len(sys.argv) > 2 else 'shoal-loadtest'
hz = os.sysconf('SC_CLK_TCK')
while True:
    t = time.time()
    rows = []
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        try:
            s = open(f'/proc/{d}/stat').read()
        except Exception:
            continue
        comm = s[s.index('(')+1:s.rindex(')')]
        if comm not in ('shoal', 'etcd', 'shoal-loadtest'): continue
        try:
            cmd = open(f'/proc/{d}/cmdline').read()
        except Exception:
            continue
        if match not in cmd: continue
        f = s[s.rindex(')')+2:].split()
        rows.append([int(d), comm, (int(f[11]) + int(f[12])) / hz])
    try:
        load = open('/proc/loadavg').read().split()[0]
    except Exception:
        load = '?'
    total = open('/proc/stat').readline().split()[1:9]
    out.write(json.dumps({'t': t, 'p': rows, 'load': load, 'cpu': [int(x) for x in total]}) + '\n')
    out.flush()
    time.sleep(0.25)
