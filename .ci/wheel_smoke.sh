#!/usr/bin/env bash
# CI: the package as cluster admins install it (`pip install .`, no -e). Builds the wheel, installs it in a
# fresh venv, and from a folder outside the source tree runs `python -m pipeline_lib validate` and a small
# workflow (synthetic plate + untrained tiny model, AIS: plan, predict, segment, measure, report).
# Snakemake puts the Snakefile's folder on sys.path, so the workflow files (Snakefile, workflow/) are
# copied without the package: every pipeline_lib import, and the config schema, must come from the wheel.
# Reuses pip's cache (torch and the other wheels are not downloaded twice). Usage: .ci/wheel_smoke.sh
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/wheel_smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip wheel --quiet --no-deps "$REPO" -w "$WORK/dist"
"$PY" -m pip install --quiet "$WORK"/dist/pipeline_lib-*.whl
echo "wheel_smoke: installed $(basename "$WORK"/dist/pipeline_lib-*.whl) in $((SECONDS - start)) s"

mkdir -p "$WORK/wf"
cp -rL "$REPO/Snakefile" "$REPO/workflow" "$REPO/config" "$WORK/wf/"
cd "$WORK"
"$PY" - "$REPO" <<'PYEOF'
import sys
from pathlib import Path
import pipeline_lib
from pipeline_lib.config import SCHEMA_PATH
where = Path(pipeline_lib.__file__).resolve()
assert Path(sys.argv[1]).resolve() not in where.parents, f"pipeline_lib imported from the source tree: {where}"
assert SCHEMA_PATH.is_file() and not SCHEMA_PATH.is_symlink(), f"no packaged schema at {SCHEMA_PATH}"
print(f"wheel_smoke: pipeline_lib from {where.parent}")
PYEOF
# the template (its input is a placeholder path): keys and values; the run config below: everything
"$PY" -m pipeline_lib validate --schema-only wf/config/config.yaml
"$PY" -m pipeline_lib synthetic-plate plate.ome.zarr --rows A --columns 1,2 --fields 2
"$PY" -m pipeline_lib tiny-model tiny >/dev/null
cat > run.yaml <<YAML
input: $WORK/plate.ome.zarr
output: $WORK/results
model: {checkpoint: $WORK/tiny/sam.pt, decoder: $WORK/tiny/decoder.pt, device: cpu}
YAML
"$PY" -m pipeline_lib validate run.yaml
"$PY" -m snakemake --snakefile wf/Snakefile --directory "$WORK" --configfile run.yaml --cores 2 --quiet rules
"$PY" - <<'PYEOF'
import json
s = json.load(open("results/summary.json"))
assert len(s["fields"]) == 4 and "n_objects" in s, s
print(f"wheel_smoke: workflow ok, {len(s['fields'])} fields, {s['n_objects']} objects")
PYEOF
echo "wheel_smoke: passed in $((SECONDS - start)) s"
