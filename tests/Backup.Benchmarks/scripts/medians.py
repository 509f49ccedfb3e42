# Medians of the bench scripts' output: python3 medians.py results.txt (label columns: wall / CPU ticks / context switches).
import sys,statistics,collections
d=collections.defaultdict(list)
for line in open(sys.argv[1]):
    p=line.split()
    if len(p)<3: continue
    for kv in p[2:]:
        k,v=kv.split('=')
        if not v: continue
        parts=v.split('/')
        d[(p[1],k)].append([float(x) for x in parts])
labels=sorted({l for l,_ in d},key=lambda x:['before','after','new','exp','qsd','backupd'].index(x) if x in ['before','after','new','exp','qsd','backupd'] else 9)
keys=[]
for l,k in d:
    if k not in keys: keys.append(k)
for k in keys:
    row=[]
    for l in labels:
        if (l,k) in d:
            vals=d[(l,k)]
            cols=list(zip(*vals))
            row.append(f"{l}: "+" / ".join(f"{statistics.median(c):.3g}" for c in cols)+f" (n={len(vals)}, min {min(cols[0]):.3g} max {max(cols[0]):.3g})")
    print(k, " | ".join(row))
