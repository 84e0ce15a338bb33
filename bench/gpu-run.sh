#!/usr/bin/env bash
# On the lent GPU machine (run there with carry [".gpu"], after bench/gpu-carry.sh here): unpacks what .gpu/
# carries into a venv of its own, then runs the serving part of bench/gpu.py and its training part. Each part's JSON
# line and log land in $OUT (or /tmp/gpu-out). Arguments go to `bench/gpu.py serve`, $TRAIN_ARGS to its
# training part; GPU_PARTS=serve (or train) runs one part only, GPU_PARTS="transport serve" adds
# bench/transport.py (Triton's Python backend on the GPU, float32 image against uint8 pixels).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
# A venv of our own over the machine's packages: the Python backend's stub ignores PYTHONPATH and takes the
# environment of the `python3` first on PATH, and it needs numpy<2 (nvidia-pytriton 0.7.0's stub returns
# outputs of the wrong size under numpy 2), so the carried packages go first and the machine's (torch) after.
base=$(python3 -c 'import site; print(site.getsitepackages()[0])')
[ -x /tmp/venv/bin/python3 ] || python3 -m venv --without-pip /tmp/venv || exit 1
site=$(/tmp/venv/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -f "$site/zz-machine-packages.pth" ]; then  # once per machine
  for part in site pytriton; do
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" ".gpu/$part.tar.xz" \
      "$site" || exit 1
  done
  echo "import site; site.addsitedir('$base')" > "$site/zz-machine-packages.pth"
fi
export PATH=/tmp/venv/bin:$site/bin:$PATH PYTHONUNBUFFERED=1  # nats-server is in $site/bin
# the stub links libpython: tritonserver gets Python's LIBDIR first (deploy/local/builders.py), where a
# static Python has none, the system's
libdir=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "/nonexistent")')
if ! ls "$libdir"/libpython3*.so.1.0 > /dev/null 2>&1; then
  export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
nvidia-smi -L || true
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.is_available())"
if [[ " ${GPU_PARTS:-serve train} " == *" serve "* ]]; then
  timeout 420 python3 bench/gpu.py serve "$@" > "$out/serve.out" 2> "$out/serve.log"
  echo "serve: exit $?"
  grep -h '^{' "$out/serve.log" "$out/serve.out" | cut -c1-3000
  tail -n 3 "$out/serve.log"
fi
if [[ " ${GPU_PARTS:-serve train} " == *" train "* ]]; then
  timeout 150 python3 bench/gpu.py train ${TRAIN_ARGS:-} > "$out/train.out" 2> "$out/train.log"
  echo "train: exit $?"
  tail -n 1 "$out/train.out"
  tail -n 3 "$out/train.log"
fi
if [[ " ${GPU_PARTS:-serve train} " == *" transport "* ]]; then  # not by default: GPU_PARTS="transport serve"
  timeout 200 python3 bench/transport.py --device cuda --clients 128 --processes 8 \
    > "$out/transport.out" 2> "$out/transport.log"
  echo "transport: exit $?"
  tail -n 1 "$out/transport.out"
  tail -n 3 "$out/transport.log"
fi
