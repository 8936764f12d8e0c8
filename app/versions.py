"""Model versions at the edge: which version of a model a request goes to (README "Model versions").

A request pinned to a version (`/v2/models/{name}/versions/{v}/...`) goes there. Otherwise the
model's traffic split decides: a request carrying the sticky key header goes to the version its
key hashes to, so one user stays on one version while the split holds; any other request takes
the next turn of a smooth weighted round robin (nginx's), which lands a 90/10 split exactly on
every 10 requests instead of only on average. Pure: no Ray, unit-tested on its own.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional

from app.errors import ModelNotFound


class VersionSplit:
    def __init__(self, model: str, weights: Mapping[str, float]):
        if not weights:
            raise ValueError(f"model {model!r}: a split needs at least one version")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"model {model!r}: split weights must be >= 0 and not all 0, got {dict(weights)}")
        self.model = model
        self.weights = dict(weights)
        self._live = [v for v, w in self.weights.items() if w > 0]
        self._current = {v: 0.0 for v in self._live}
        self._total = float(sum(self.weights.values()))

    @property
    def versions(self) -> list[str]:
        return list(self.weights)

    def check(self, version: str) -> str:
        """A pinned version, checked: 404 naming the versions there are."""
        if version not in self.weights:
            raise ModelNotFound(f"model {self.model!r} has no version {version!r}; versions: {self.versions}")
        return version

    def pick(self, key: Optional[str] = None) -> str:
        if key is not None:
            return self._by_key(key)
        # Smooth weighted round robin: each turn every version gains its weight, the leader is
        # picked and pays the total back.
        for v in self._live:
            self._current[v] += self.weights[v]
        best = max(self._live, key=lambda v: self._current[v])
        self._current[best] -= self._total
        return best

    def _by_key(self, key: str) -> str:
        """The version a sticky key maps to: a stable hash onto the cumulative weights, so a key
        moves only when the split moves past it."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2**64 * self._total
        upto = 0.0
        for v in self._live:
            upto += self.weights[v]
            if point < upto:
                return v
        return self._live[-1]
