#!/usr/bin/env bash
# Quick start: install, run the driver on the sim backend, and capture with ffmpeg.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out=${1:-/tmp/impv4l2-demo.mkv}
log=/tmp/impv4l2-demo.log
.venv/bin/impv4l2 serve >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do .venv/bin/impv4l2 list >/dev/null 2>&1 && break; sleep 0.1; done
.venv/bin/impv4l2 list
node=$(.venv/bin/impv4l2 list --json | .venv/bin/python -c 'import json,sys; print(next(n["paths"]["fuse"] for n in json.load(sys.stdin) if n["role"] == "main"))')
echo "capturing 100 frames from $node with ffmpeg ..."
ffmpeg -hide_banner -loglevel error -y -f v4l2 -input_format nv12 -video_size 1920x1080 -i "$node" -frames:v 100 "$out"
ffprobe -v error -count_frames -select_streams v:0 \
    -show_entries stream=codec_name,width,height,nb_read_frames -of default=noprint_wrappers=1 "$out"
echo "wrote $out (driver log: $log)"
