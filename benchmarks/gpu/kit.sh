#!/usr/bin/env bash
# Builds, where talkedit is fully installed, what `benchmarks/gpu/run.sh` reads on a GPU machine that has only
# torch, numpy, safetensors and OpenCV. Everything goes under .gpu/ (ignored by git), in folders that each travel
# with one command beside the repository (at most PART_MIB, default 33 MiB: the GPU machines lent to this project
# take 64 MiB per command, and the repository is about 27).
#
#   bash benchmarks/gpu/kit.sh held LipNet/data/s1 LipNet-samples/evaluation/samples   # .gpu/w .gpu/x, minutes
#   bash benchmarks/gpu/kit.sh pack       # .gpu/p1 .gpu/p2: the whole s1 pack in parts (15 min on 2 Xeon cores)
#   bash benchmarks/gpu/kit.sh deps       # .gpu/k1 .gpu/k2 ...: ffmpeg, wheels, media for run.sh dub1080; .gpu/f
#   bash benchmarks/gpu/kit.sh suite      # .gpu/t1 .gpu/t2 ...: pytest, the CLI's packages, ../shared: run.sh suite
#   bash benchmarks/gpu/kit.sh control-model PART...   # .gpu/c/control.safetensors from the parts `control` returned
#   bash benchmarks/gpu/kit.sh control-work DUBS METRICS   # .gpu/c, for `grid_s1.py --work .gpu/c eval`
#
# GRID s1 comes from TVR28/LipNet (data/s1), the other speakers from rizkiarm/LipNet (evaluation/samples); see
# benchmarks/grid_s1.py. The s1 work folder, .gpu/s1, is also where `grid_s1.py eval` runs afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
PART_MIB=${PART_MIB:-33}
KIT_PYTHON=${KIT_PYTHON:-3.12}  # the GPU machine's Python
SHARED=${SHARED:-../shared}     # media and the face landmarker, as the tests use them
PY=${PYTHON:-python}
export TALKEDIT_HOME=${TALKEDIT_HOME:-$PWD/.gpu/home}

log() { echo "== $*" >&2; }

landmarker() {
  mkdir -p "$TALKEDIT_HOME"
  local cached=$TALKEDIT_HOME/face-landmarker.task
  [[ -f $cached ]] || cp "$SHARED/models/face_landmarker.task" "$cached"
}

# split_parts FILE PREFIX: FILE in equal parts NAME.part1..N, one to a folder .gpu/PREFIX1..N, each with NAME.sha256.
split_parts() {
  local file=$1 prefix=$2 name; name=$(basename "$file")
  local size; size=$(stat -c %s "$file")
  local parts=$(((size + PART_MIB * 1048576 - 1) / (PART_MIB * 1048576)))
  local sum; sum=$(sha256sum "$file" | cut -d' ' -f1)
  rm -rf .gpu/"$prefix"[0-9]*
  local tmp; tmp=$(mktemp -d)
  split -n "$parts" --numeric-suffixes=1 -a 1 "$file" "$tmp/$name.part"
  for k in $(seq "$parts"); do
    mkdir -p ".gpu/$prefix$k"
    mv "$tmp/$name.part$k" ".gpu/$prefix$k/"
    echo "$sum" > ".gpu/$prefix$k/$name.sha256"
  done
  rmdir "$tmp"
  log "$file: $parts parts in .gpu/${prefix}1..$parts ($(du -sh .gpu/"$prefix"1 | cut -f1) each)"
}

held() {
  local s1=${1:?"GRID s1's folder of .mpg (data/s1 of TVR28/LipNet)"}
  local others=${2:?"evaluation/samples of rizkiarm/LipNet"}
  landmarker
  $PY benchmarks/grid_s1.py --work .gpu/s1 prepare "$s1"
  $PY benchmarks/grid_s1.py --work .gpu/s1 pack --held-out-only
  mkdir -p .gpu/w && cp .gpu/s1/held.pack .gpu/s1/held-out.txt .gpu/w/
  $PY benchmarks/grid_s1.py --work .gpu/x prepare-others "$others"
  $PY benchmarks/grid_s1.py --work .gpu/x pack --held-out-only
  du -sh .gpu/w .gpu/x
}

pack() {
  [[ -f .gpu/s1/order.txt ]] || { log "run 'held' first"; exit 2; }
  landmarker
  $PY benchmarks/grid_s1.py --work .gpu/s1 pack
  split_parts .gpu/s1/grid-s1.pack p
}

# What the GPU machine lacks for a whole dub: these packages, at the versions installed here (so the GPU runs the
# code that the tests here ran), ffmpeg (imageio-ffmpeg's binary, 165 MB, travels xz-compressed instead of its 68 MB
# wheel), and Debian's libEGL/libGLESv2 (apt-get download: a Debian or Ubuntu machine here).
WHEELS="mediapipe flatbuffers sounddevice librosa soxr audioread pooch platformdirs soundfile cffi pycparser decorator
ffmpeg-python future"

deps() {
  local kit=.gpu/kit
  rm -rf "$kit" && mkdir -p "$kit/wheels" "$kit/shared/media/video" "$kit/shared/media/audio" "$kit/shared/models"
  for name in $WHEELS; do
    local version; version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$KIT_PYTHON" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$kit/wheels" "$name==$version"
  done
  # MediaPipe's library links libEGL and libGLESv2, which a CUDA image may not have (used there only if missing).
  mkdir -p "$kit/debs" && (cd "$kit/debs" && apt-get download libegl1 libgles2 libglvnd0)
  local ffmpeg; ffmpeg=$($PY -c "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())")
  log "compressing $ffmpeg (about 2 minutes)"
  xz -T0 -9 -c "$ffmpeg" > "$kit/ffmpeg.xz"
  cp "$SHARED/media/video/male_restaurant_noisy_headmotion_1280x720_25fps.mp4" "$kit/shared/media/video/"
  cp "$SHARED/media/audio/en_male_jfk_speech_44k1_stereo_24bit.flac" "$kit/shared/media/audio/"
  cp "$SHARED/models/face_landmarker.task" "$kit/shared/models/"
  tar -cf .gpu/kit.tar -C "$kit" .
  # For run.sh check: the reference model's fp16 test samples the official inputs.
  rm -rf .gpu/f && mkdir -p .gpu/f/fixtures
  cp "$SHARED/fixtures/dve_sampler_reference.safetensors" .gpu/f/fixtures/
  split_parts .gpu/kit.tar k
  rm -rf "$kit" .gpu/kit.tar
}

# What the whole test suite needs on top of the dub kit (deps): pytest and the CLI's and the hub's packages with
# their dependencies, at the versions installed here, and all of ../shared (spec, fixtures, media, models).
SUITE_PACKAGES="typer huggingface-hub pytest"

suite() {
  local kit=.gpu/suite
  rm -rf "$kit" && mkdir -p "$kit/wheels" "$kit/shared"
  local pins; pins=$(mktemp)
  $PY -m pip freeze --exclude-editable | grep -v '^torch' > "$pins"
  $PY -m pip download -q --only-binary=:all: --python-version "$KIT_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -c "$pins" -d "$kit/wheels" $SUITE_PACKAGES
  # python_speech_features (the reference MFCCs of the SyncNet tests) is published as source only.
  $PY -m pip wheel -q --no-deps -w "$kit/wheels" "$(grep -i '^python.speech.features==' "$pins")"
  # imageio-ffmpeg built from source has no binary: run.sh points it at the dub kit's ffmpeg (its own, compressed).
  $PY -m pip wheel -q --no-deps --no-binary imageio-ffmpeg -w "$kit/wheels" "$(grep -i '^imageio.ffmpeg==' "$pins")"
  rm "$pins"
  cp -r "$SHARED/spec" "$SHARED/fixtures" "$SHARED/media" "$SHARED/models" "$kit/shared/"
  tar -cf .gpu/suite.tar -C "$kit" .
  # 101 MB: three parts of 34 MiB (beside the 27.2 MiB tree, within 64) save a command against four of 33.
  PART_MIB=34 split_parts .gpu/suite.tar t
  rm -rf "$kit" .gpu/suite.tar
}

control_model() {
  mkdir -p .gpu/c
  $PY benchmarks/grid_s1.py join "$@" -o .gpu/c/control.safetensors
}

# control-work DUBS METRICS: .gpu/c as a work folder for `grid_s1.py --work .gpu/c eval`: s1's clips and lists, the
# control's dubs (the folder `control-dubs` returned) and its training metrics (`control`'s control-metrics.jsonl).
control_work() {
  local dubs=${1:?"the folder control-dubs returned"} metrics=${2:?"control-metrics.jsonl"}
  mkdir -p .gpu/c/dubs .gpu/c/train-v
  for f in clips order.txt held-out.txt held.pack; do ln -sfn "../s1/$f" ".gpu/c/$f"; done
  cp "$dubs"/*.safetensors "$dubs"/dubs.json .gpu/c/dubs/
  cp "$metrics" .gpu/c/train-v/metrics.jsonl
}

stage=${1:?"a stage: held S1 OTHERS, pack, deps, suite, control-model PART... or control-work DUBS METRICS"}
shift
case $stage in
  held | pack | deps | suite) $stage "$@" ;;
  control-model) control_model "$@" ;;
  control-work) control_work "$@" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
