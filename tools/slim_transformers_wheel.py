"""Shrink the transformers wheel in .whl/ to the model families this project serves.

The GPU machine takes at most 64 MiB of carried files and the full transformers wheel is 13 MB of a
budget the slim Ray wheel already mostly uses. Usage, after ../shared/tools/device-wheels.sh
transformers==5.23.0 tokenizers==0.23.3 huggingface-hub==2.4.0 safetensors==0.8.0:

    python3 tools/slim_transformers_wheel.py .whl/transformers-5.23.0-py3-none-any.whl
"""

import os
import sys
import tempfile
import zipfile

# The families served here, plus those DeepSpeed AutoTP names directly (module_inject/*.py).
KEEP = {"__init__.py", "auto", "bert", "llama", "opt", "encoder_decoder", "gpt2", "bloom", "gemma3"}


def _keep(name: str) -> bool:
    parts = name.split("/")
    return not (len(parts) > 2 and parts[0] == "transformers" and parts[1] == "models" and parts[2] not in KEEP)


def main(path: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".whl", dir=os.path.dirname(path) or ".")
    os.close(fd)
    with zipfile.ZipFile(path) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
        for info in zi.infolist():
            if not _keep(info.filename):
                continue
            data = zi.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if _keep(ln.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            zo.writestr(info, data)
    os.replace(tmp, path)
    print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1])
