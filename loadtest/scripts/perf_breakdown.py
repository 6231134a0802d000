#!/usr/bin/env python3
"""perf_breakdown.py SCRIPT: shares of a `perf script` dump (DWARF call graphs of one shoal
process) by where the time goes; a sample counts for every row whose frame its stack holds."""
import sys,collections
stacks=[];cur=[]
for line in open(sys.argv[1]):
    if not line.strip():
        if cur: stacks.append(cur); cur=[]
        continue
    if line[0] in ' \t':
        parts=line.strip().split(None,1)
        if len(parts)==2: cur.append(parts[1].rsplit(' (',1)[0])
if cur: stacks.append(cur)
n=len(stacks); print('samples',n)
def share(pred): return sum(1 for s in stacks if any(pred(f) for f in s))/n*100
rows=[
 ('state machine apply (apply_batch)',lambda f:'sm::Inner::apply_batch' in f),
 ('  of it RocksDB writes',lambda f:False),
 ('  of it RocksDB point reads (lookup)',lambda f:False),
 ('Raft log append (write_synced) incl. fsync',lambda f:'write_synced' in f),
 ('Raft log reads (entries_blocking)',lambda f:'entries_blocking' in f),
 ('snapshot build',lambda f:'build_snapshot_blocking' in f),
 ('HTTP server (hyper, axum, handlers)',lambda f:'http_server::serve' in f or 'hyper::' in f),
 ('QUIC (quinn, rustls)',lambda f:'quinn' in f or 'rustls' in f),
 ('forwarding (consensus::net::forward)',lambda f:'net::forward' in f),
 ('rkyv encode/decode',lambda f:'rkyv' in f),
 ('allocator (mimalloc)',lambda f:f.startswith(('_mi_','mi_'))),
 ('kernel (syscalls)',lambda f:'do_syscall_64' in f),
]
def both(a,b): return sum(1 for s in stacks if any(a(f) for f in s) and any(b(f) for f in s))/n*100
for name,pred in rows:
    if name=='  of it RocksDB writes': v=both(lambda f:'sm::Inner::apply_batch' in f, lambda f:'rocksdb::DBImpl::WriteImpl' in f)
    elif name=='  of it RocksDB point reads (lookup)': v=both(lambda f:'sm::Inner::apply_batch' in f, lambda f:'rocksdb::DBImpl::GetImpl' in f)
    else: v=share(pred)
    print(f'| {name} | {v:.1f} % |')
