"""ONNX exports on disk, keyed by what they were built from, so a second start skips the export.

A cached file is used only when the digest recorded beside it matches both the key it was built
for and the file's own bytes; anything else (a truncated write, a corrupted file, an export of
other weights or of another exporter version) is rebuilt. Files are written under a temporary name
and renamed into place, so replicas that start together on one host never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger("ray.serve")

CACHE_ENV = "BATCHSERVE_EXPORT_CACHE"


def cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "batchserve" / "exports"


def content_key(model: nn.Module, config_json: str, exporter: str) -> str:
    """sha256 over the exporter's identity, the model's class and config, and every weight's bytes."""
    h = hashlib.sha256()
    h.update(exporter.encode())
    h.update(type(model).__qualname__.encode())
    h.update(config_json.encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ExportCache:
    """One model's directory of exported files (`<root>/<name>-<key prefix>/`)."""

    def __init__(self, root: Path, name: str, key: str):
        self.key = key
        self.dir = root / f"{name}-{key[:20]}"

    def _sidecar(self, path: Path) -> Path:
        return path.with_name(path.name + ".sha256")

    def lookup(self, filename: str) -> Path | None:
        """The cached file if it is whole and was built for this key; None otherwise (and why, logged)."""
        path = self.dir / filename
        sidecar = self._sidecar(path)
        if not path.exists() or not sidecar.exists():
            return None
        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            recorded = {}
        if recorded.get("key") != self.key:
            logger.warning("export cache %s: built for another model or exporter; rebuilding", path)
            return None
        if recorded.get("sha256") != file_digest(path):
            logger.warning("export cache %s: contents do not match their recorded digest (corrupt); rebuilding", path)
            return None
        return path

    def get(self, filename: str, build: Callable[[Path], None], force: bool = False) -> tuple[Path, bool]:
        """(path, reused): the cached file, or `build(tmp_path)` run now and recorded."""
        if not force:
            hit = self.lookup(filename)
            if hit is not None:
                return hit, True
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / filename
        fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=self.dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            build(tmp)
            digest = file_digest(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._write_atomic(self._sidecar(path), json.dumps({"key": self.key, "sha256": digest}))
        return path, False

    def _write_atomic(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
