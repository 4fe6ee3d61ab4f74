#!/usr/bin/env bash
# The paper study, resumed in the background from where its checkpoints stand (docs/paper/README.md).
#   bash docs/paper/continue.sh          start (or resume) it; prints the pid and where it logs; while it runs,
#                                        its checkpoints are copied into carry/ every 10 minutes (not committed)
#   bash docs/paper/continue.sh carry    copy its checkpoints into docs/paper/carry/state/ (then commit them)
#   bash docs/paper/continue.sh report   the finished methods' comparison rendered by this checkout's code (goal
#                                        check included) in runs/paper-report/; trains nothing; needs the
#                                        torch the checkpoints were made with (2.13.0: the fingerprint holds it)
#   bash docs/paper/continue.sh rescore  the same, in runs/paper-rescore/, after each finished method's final
#                                        evaluation ran again from its checkpoint (`--rescore`: the clients'
#                                        right answers for the paired goal check); minutes, not hours
# From any folder, in a virtualenv with fedslip installed. Between docs/paper/carry/ and runs/paper/ the
# checkpoint further along (more rounds; finished beats unfinished) wins, in both directions.
set -euo pipefail
cd "$(dirname "$0")/../.."
CODE=0eee8b0                                 # the code of every round since round 7; keep it for the study
WORKTREE=${PAPER_WORKTREE:-$(cd .. && pwd)/paper-wt-$CODE}
DATA=/work/shared/data/ag_news               # the fingerprint holds this exact path
METHODS=fedslip-plus,fedavg,fedslip,dualtrack-naive,local,fedprox,fedsa,fedsb  # the issue: then fedprox, fedsa, fedsb
CARRY=docs/paper/carry/state RUN=runs/paper/state

progress() {  # 2 x rounds + finished, of one checkpoint; 0 when absent
  [ -f "$1" ] || { echo 0; return; }
  python -c 'import sys; from fedslip.federation.checkpoint import read_meta
m = read_meta(sys.argv[1]); print(2 * len(m["rounds"]) + bool(m.get("finished")))' "$1"
}
newer() {  # copy every checkpoint of $1 into $2 that is further along than $2's copy
  mkdir -p "$2"
  for f in "$1"/*.safetensors; do
    [ -f "$f" ] || continue
    t="$2/$(basename "$f")"
    a=$(progress "$f")
    b=$(progress "$t")
    if [ "$a" -gt "$b" ]; then cp "$f" "$t"; echo "$f -> $t"; fi
  done
}

if [ "${1:-}" = carry ]; then newer "$RUN" "$CARRY"; exit 0; fi
if [ "${1:-}" = report ] || [ "${1:-}" = rescore ]; then
  OUT=runs/paper-$1
  EXTRA=(); [ "$1" = rescore ] && EXTRA=(--rescore)
  rm -rf "$OUT" && mkdir -p "$OUT/state"
  done_methods=()
  for m in ${METHODS//,/ }; do
    for f in "$RUN/$m.safetensors" "$CARRY/$m.safetensors"; do
      [ -f "$f" ] || continue
      n=$(progress "$f")  # odd when finished; an unreadable checkpoint stops the script
      if [ $((n % 2)) -eq 1 ]; then cp "$f" "$OUT/state/"; done_methods+=("$m"); break; fi
    done
  done
  [ ${#done_methods[@]} -gt 0 ] || { echo "no finished method yet"; exit 2; }
  list=$(IFS=,; echo "${done_methods[*]}")
  HF_HUB_OFFLINE=1 fedslip compare --preset paper --methods "$list" --set train.precision='"fp32"' \
    --data-dir "$DATA" --out "$OUT" --resume ${EXTRA[@]+"${EXTRA[@]}"}
  exit 0
fi
if pid=$(pgrep -f "fedslip compare --preset paper .*--out runs/paper --resume" | head -1) && [ -n "$pid" ]; then
  echo "already running: pid $pid, log runs/paper.log"; exit 0
fi
[ -d "$WORKTREE" ] || git worktree add "$WORKTREE" "$CODE"
newer "$CARRY" "$RUN"
PYTHONPATH="$WORKTREE/src" HF_HUB_OFFLINE=1 nohup python -m fedslip compare --preset paper --methods "$METHODS" \
  --set train.precision='"fp32"' --data-dir "$DATA" --out runs/paper --resume >> runs/paper.log 2>&1 &
study=$!
echo $study > runs/paper.pid
# every 10 minutes while it runs, its checkpoints into carry/ (uncommitted): a session cut off before its own
# `carry` still leaves them in the work tree
( while kill -0 "$study" 2>/dev/null; do sleep 600; newer "$RUN" "$CARRY" >> runs/paper.log 2>&1 || true; done ) \
  > /dev/null 2>&1 &
echo "started: pid $study, log runs/paper.log; progress: fedslip status runs/paper; checkpoints copied into $CARRY every 10 min"
