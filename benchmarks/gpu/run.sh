#!/usr/bin/env bash
# The GPU measurements of README (issue 11), one stage per command, on a GPU machine that has only torch, numpy,
# safetensors and OpenCV (the ones lent to this project). Run from the repository root:
#
#   bash benchmarks/gpu/run.sh check            # CUDA tests; sampler eager vs CUDA graphs; a 10 s shot in short chains
#   bash benchmarks/gpu/run.sh compile          # sampler under torch.compile (minutes of compiling per batch size)
#   bash benchmarks/gpu/run.sh cross            # cross-speaker dubs of .gpu/x, chain study on .gpu/w (reference model)
#   bash benchmarks/gpu/run.sh control          # the shuffled-audio control, 2,500 steps on the whole s1 pack
#   bash benchmarks/gpu/run.sh control-start    # the same detached, for the next commands to run beside it
#   bash benchmarks/gpu/run.sh control-dubs     # its held-out dubs
#   bash benchmarks/gpu/run.sh dub1080 [ARGS]   # benchmarks/dub.py --model full at 1080p, with and without CUDA graphs
#   bash benchmarks/gpu/run.sh analysis1080     # benchmarks/dub.py (tiny model): the analysis in 1 and 8 threads
#   bash benchmarks/gpu/run.sh suite [ARGS]     # the whole test suite (pytest ARGS), cuda tests included
#   bash benchmarks/gpu/run.sh park DIR...      # copy carried parts to /tmp/talkedit-park; chain with && before a stage
#
# What the stages read comes from `benchmarks/gpu/kit.sh` (run where talkedit is fully installed) under .gpu/. A
# file too large to travel with one command (the s1 pack, the 1080p kit) is split in parts: the commands before the
# stage that needs it `park` the first parts in /tmp (it survives while the machine stays warm), and the stage joins
# them with the last part it carries and checks the sha256. Results go to $OUT (logs, dubs, parts of models), or to
# .gpu/out when OUT is unset.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-.gpu/out}
PARK=/tmp/talkedit-park
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

# Sizes of the runs; the environment may shrink them to try the script on a CPU (README "Benchmarks").
STEPS=${STEPS:-25}                 # DDIM steps of the reference model's dubs (README: 25 costs little against 50)
RANDOM_STEPS=${RANDOM_STEPS:-10}   # DDIM steps of the random-weight baseline
CHAIN_CLIPS=${CHAIN_CLIPS:-10}     # held-out clips of the chain study
CLIPS=${CLIPS:-}                   # held-out clips to dub (all by default: 10 in .gpu/x, 50 in .gpu/w)
TRAIN_STEPS=${TRAIN_STEPS:-2500}   # the control's steps: those of the reference model
ARCH=${ARCH:-dve}                  # dve: the paper's UNet; small: to try the control stage on a CPU
DUB_STEPS=${DUB_STEPS:-50}         # dub's default steps, for the 1080p benchmark
DUB_MODEL=${DUB_MODEL:-full}       # benchmarks/dub.py --model

log() { echo "== $*" >&2; }

# park DIR...: copy each carried DIR's files to $PARK, for a later command's `join`.
park() {
  mkdir -p "$PARK"
  for dir in "$@"; do cp "$dir"/* "$PARK"/ && log "parked $(ls "$dir" | tr '\n' ' ')"; done
}

# join NAME CARRIED TARGET: NAME.part* from $PARK and the carried folder, end to end, checked against NAME.sha256.
join() {
  local name=$1 carried=$2 target=$3
  mkdir -p "$(dirname "$target")"
  : > "$target"
  local k=1 part
  while part=$carried/$name.part$k && [[ -f $part ]] || part=$PARK/$name.part$k && [[ -f $part ]]; do
    cat "$part" >> "$target" && k=$((k + 1))
  done
  local want; want=$(cat "$carried/$name.sha256")
  if [[ $(sha256sum "$target" | cut -d' ' -f1) != "$want" ]]; then
    log "$target: sha256 differs from $carried/$name.sha256 (a part missing? park the earlier parts first)"
    return 1
  fi
  log "joined $target ($(du -h "$target" | cut -f1))"
}

# shared_from DIR: DIR's files into the ../shared where the tests and benchmarks look (../shared, unless the machine
# has one, becomes a link to /tmp/talkedit-shared).
shared_from() {
  mkdir -p /tmp/talkedit-shared && cp -r "$1"/. /tmp/talkedit-shared/
  [[ -e ../shared ]] || ln -s /tmp/talkedit-shared ../shared
}

check() {
  [[ -d .gpu/f ]] && shared_from .gpu/f  # the sampler fixture of the reference model's fp16 test
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
  $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cudagraph.py tests/test_diffusion.py \
    tests/test_reference_model.py
  for graphs in "" --cuda-graphs; do
    $PY benchmarks/sampler.py $graphs
    $PY benchmarks/sampler.py --batch 64 --frames 64 $graphs
    $PY benchmarks/sampler.py --shot 10 --chain-seconds 1 0.5 --steps 25 $graphs
  done
}

compile() {
  for batch in 16 64; do $PY benchmarks/sampler.py --batch $batch --frames $batch --compile reduce-overhead; done
}

cross() {
  $PY benchmarks/grid_s1.py --work .gpu/x dubs --model models/grid-s1.safetensors --steps "$STEPS" \
    --random-steps "$RANDOM_STEPS" ${CLIPS:+--clips "$CLIPS"} --out "$OUT/x"
  $PY benchmarks/grid_s1.py --work .gpu/w chains --model models/grid-s1.safetensors --steps "$STEPS" \
    --clips "$CHAIN_CLIPS" --out "$OUT/w"
}

CONTROL=/tmp/talkedit-control  # on the GPU machine: the joined pack, the run, the model

# train_control MINUTES: the reference model's command with --shuffle-audio, stopping at a checkpoint before MINUTES;
# a second call on the warm machine continues it.
train_control() {
  local resume=()
  [[ -f $CONTROL/train/checkpoint.pt ]] && resume=(--resume)
  $PY -m talkedit.train "$CONTROL/grid-s1.pack" -o "$CONTROL/control.safetensors" --workdir "$CONTROL/train" \
    --arch "$ARCH" --prediction v --shuffle-audio --steps "$TRAIN_STEPS" --val-fraction 0.05005 --eval-every 500 \
    --checkpoint-every 500 --log-every 100 --time-limit "$1" "${resume[@]}" 2>&1 | grep -v validating
}

# control_pack: the whole s1 pack, joined once per warm machine from the parked part and the carried .gpu/p2.
control_pack() {
  [[ -f $CONTROL/grid-s1.pack ]] || join grid-s1.pack .gpu/p2 "$CONTROL/grid-s1.pack"
}

# background_pid: the pid of control-start's training while it runs; nothing otherwise.
background_pid() {
  local pid; pid=$(cat "$CONTROL/background.pid" 2>/dev/null)
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# control-start: the control's training detached, so that the next commands (the suite's parts: CPU-bound) run while
# it trains; `control` then waits for it. Not before GPU timings (check, cross, dub1080): it shares the GPU.
control_start() {
  mkdir -p "$CONTROL"
  local pid; pid=$(background_pid)
  if [[ -n $pid ]]; then log "already training (pid $pid)"; return 0; fi
  control_pack || return 1
  rm -f "$CONTROL/background.pid"  # the run writes its own (setsid's, where it forks, would be gone at once)
  OUT=$CONTROL/out setsid nohup bash benchmarks/gpu/run.sh control-train > "$CONTROL/background.log" 2>&1 < /dev/null &
  for _ in {1..50}; do [[ -s $CONTROL/background.pid ]] && break; sleep 0.1; done
  log "training the control in the background (pid $(cat "$CONTROL/background.pid"), log $CONTROL/background.log);" \
    "'control' collects it"
}

# control: the model, in fp16 parts, and the training metrics. Waits (up to 8.5 minutes) for a training that
# control-start began; trains (or goes on training) itself otherwise, the background run having ended or been stopped.
control() {
  mkdir -p "$CONTROL"
  local pid; pid=$(background_pid)
  if [[ -n $pid ]]; then
    log "waiting for the background training (pid $pid)"
    local deadline=$((SECONDS + 510))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 5; done
    tail -n 4 "$CONTROL/background.log"
    if kill -0 "$pid" 2>/dev/null; then
      log "still training in the background: run 'control' again while the machine is warm"
      return 0
    fi
  fi
  rm -f "$CONTROL/background.pid"
  if [[ ! -f $CONTROL/control.safetensors ]]; then
    control_pack || return 1
    train_control 8.5
  fi
  cp "$CONTROL/train/metrics.jsonl" "$OUT/control-metrics.jsonl"
  if [[ -f $CONTROL/control.safetensors ]]; then
    $PY benchmarks/grid_s1.py half --model "$CONTROL/control.safetensors" --out "$OUT/model"
  else
    log "stopped before $TRAIN_STEPS steps: run 'control' again while the machine is warm"
  fi
}

control_dubs() {
  local model=$CONTROL/control.safetensors
  [[ -f $model ]] || model=.gpu/c/control.safetensors  # the machine went cold: carry .gpu/c (kit.sh control-model)
  mkdir -p "$CONTROL" && cp -n .gpu/w/held.pack .gpu/w/held-out.txt "$CONTROL"/
  # --random-steps 1: the random-weight row is the reference run's; the eval only needs the file.
  $PY benchmarks/grid_s1.py --work "$CONTROL" dubs --model "$model" --steps "$STEPS" --random-steps 1 \
    ${CLIPS:+--clips "$CLIPS"} --out "$OUT/c"
}

# unpack NAME CARRIED DIR: NAME joined (see join), unpacked into DIR, and its wheels installed into DIR/site.
unpack() {
  local name=$1 carried=$2 dir=$3
  join "$name" "$carried" "/tmp/talkedit-$name" || return 1
  mkdir -p "$dir" && tar -xf "/tmp/talkedit-$name" -C "$dir" || return 1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$dir/site" "$dir"/wheels/*.whl
}

KIT=/tmp/talkedit-kit  # on the GPU machine: ffmpeg, wheels, media and the landmarker from kit.sh deps

# kit: join and install the kit (once per warm machine) and put its ffmpeg, packages and media where talkedit looks.
kit() {
  if [[ ! -d $KIT/site ]]; then
    unpack kit.tar .gpu/k3 "$KIT" || return 1
    $PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
      "$KIT/ffmpeg.xz" "$KIT/ffmpeg" && chmod +x "$KIT/ffmpeg"
  fi
  export PYTHONPATH="$PYTHONPATH:$KIT/site" TALKEDIT_FFMPEG="$KIT/ffmpeg"
  # MediaPipe's library links libEGL and libGLESv2: the kit's, where the machine has none.
  if ! { ldconfig -p | grep -q 'libEGL.so.1 ' && ldconfig -p | grep -q 'libGLESv2.so.2 '; }; then
    for deb in "$KIT"/debs/*.deb; do dpkg -x "$deb" "$KIT/gl"; done
    export LD_LIBRARY_PATH="$KIT/gl/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    log "libEGL from the kit"
  fi
  shared_from "$KIT/shared"  # the benchmark's media and the face landmarker
  "$KIT/ffmpeg" -version | head -1
  $PY -c 'import librosa, mediapipe; print("librosa", librosa.__version__, "mediapipe", mediapipe.__version__)'
}

dub1080() {
  kit || return 1
  for graphs in no yes; do
    $PY benchmarks/dub.py --model "$DUB_MODEL" --steps "$DUB_STEPS" --cuda-graphs $graphs "$@"
  done
}

# The CPU side of a 1080p dub on the GPU machine's cores: the analysis in one thread and in one per core (at most
# 8), with the tiny model so that the UNet takes little of the time.
analysis1080() {
  kit || return 1
  nproc
  for workers in 1 8; do $PY benchmarks/dub.py --analysis-workers $workers "$@"; done
}

SUITE=/tmp/talkedit-suite  # on the GPU machine: pytest, the CLI's and the hub's packages, all of ../shared

# suite [PYTEST ARGS]: the whole test suite, `cuda` tests included, on the dub kit plus kit.sh's suite kit (its
# parts parked, the last carried). Run it in parts, each within a command's 10 minutes (README "GPU runs").
suite() {
  kit || return 1
  if [[ ! -d $SUITE/site ]]; then
    unpack suite.tar "$(ls -d .gpu/t[0-9]* | tail -1)" "$SUITE" || return 1  # the one part this command carries
  fi
  export PYTHONPATH="$PYTHONPATH:$SUITE/site" IMAGEIO_FFMPEG_EXE="$KIT/ffmpeg"
  shared_from "$SUITE/shared"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -m pytest -q -p no:cacheprovider -rfEs --durations 15 "$@"
}

stage=${1:?"a stage: check, compile, cross, control(-start), control-dubs, dub1080, analysis1080, suite, park DIR..."}
shift
case $stage in
  park) park "$@" ;;
  control-start) control_start 2>&1 | tee "$OUT/$stage.log" ;;
  control-train) echo $$ > "$CONTROL/background.pid" && train_control 60 ;;  # control-start's run, detached
  check | compile | cross | control | dub1080 | analysis1080 | suite) $stage "$@" 2>&1 | tee "$OUT/$stage.log" ;;
  control-dubs) control_dubs 2>&1 | tee "$OUT/$stage.log" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
