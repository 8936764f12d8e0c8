"""Rewrite a transformers wheel with only the model families the device runs need, so that the
device carry (64 MiB in all) has room for HAProxy: the wheel goes from 13.3 to 3.9 MB. Families
in KEEP stay whole (bench/generate_*.yaml's llama and bert's tokenizer, a few real-model families,
and what auto's imports pull in); of the others only `__init__.py` and `configuration_*.py` stay,
because `transformers serve` lists the auto mappings' keys, which imports every family's config.

    python -m bench.slim_transformers_wheel WHEEL   # rewrites WHEEL in place
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

KEEP = {"auto", "llama", "opt", "gpt2", "qwen2", "bert", "encoder_decoder", "align"}


def kept(name: str) -> bool:
    parts = name.split("/")
    if len(parts) <= 3 or parts[:2] != ["transformers", "models"] or parts[2] in KEEP:
        return True
    return len(parts) == 4 and (parts[3] == "__init__.py" or parts[3].startswith("configuration_"))


def slim(wheel: Path) -> None:
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if not kept(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # pip reads it: no entries for files gone
                data = "".join(line + "\n" for line in data.decode().splitlines() if kept(line.split(",")[0])).encode()
            out.writestr(info, data)
    tmp.replace(wheel)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        slim(Path(arg))
