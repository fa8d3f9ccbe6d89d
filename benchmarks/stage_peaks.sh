#!/bin/bash
# Peak process GPU memory of stages 01, 03 and 04 on a slice of the rehearsal, in one short GPU call:
# one epoch of 03 on 240 training studies, then 04's sweep scaled to that slice. Each stage runs through
# `medcap run --profile rehearsal` (4 GB budget, the fitted batch), nvidia-smi sampling every 0.2 s.
# It checks the memory cap (devices.LIBRARY_WORKSPACE_GB) in ~5 minutes where the whole rehearsal takes 16.
#
#   python -m medcap_helpers.rehearsal data/rehearsal --workers 16     # set-up (not timed)
#   bash benchmarks/stage_peaks.sh [run folder, default runs/stage-peaks]
#
# Writes $OUT (or the run folder) /stage_peaks.log and the executed notebooks.
set -u
run=${1:-runs/stage-peaks}
out=${OUT:-$run}
mkdir -p "$out"
[ "$out" != "$run" ] && mkdir -p "$out/notebooks"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/stage_peaks.log"
common=(--profile rehearsal --out "$run" --no-progress --skip-check --set data_path=data/rehearsal/NLMCXR_reports.tgz
        --set images_dir=data/rehearsal/NLMCXR_png --set max_train_examples=240 --set num_train_epochs=1)
for stage in 01 03 04; do
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 200 > "$out/smi$stage.csv" &
  poller=$!
  start=$(date +%s)
  timeout 200 python -m medcap_helpers.cli run "${common[@]}" --stages $stage >> "$out/run.log" 2>&1
  rc=$?
  kill $poller
  echo "stage $stage rc $rc in $(( $(date +%s) - start )) s, peak process MiB: $(sort -t, -k2 -n "$out/smi$stage.csv" | tail -1)" \
    | tee -a "$out/stage_peaks.log"
  rm -f "$out/smi$stage.csv"
done
[ "$out" != "$run" ] && cp "$run"/notebooks/*.ipynb "$out/notebooks/"
grep -i "error\|Traceback" "$out/run.log" | head
