#!/bin/bash
# runq.sh a b c: wait until no research experiment runs, then run these one after another
cd /work/main && . .venv/bin/activate
while pgrep -f "python research/(exp|diag|own)" >/dev/null; do sleep 20; done
for s in "$@"; do
  python research/$s.py 2>&1 | grep --line-buffered -v -i "warn\|torchvision\|Loading" > research/$s.log
done
