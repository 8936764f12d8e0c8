"""Cost of tokenising one text on one thread: the Rust pipeline against the ASCII WordPiece fast
path (app/models/wordpiece.py), with its word cache warm and cold.

    python -m bench.tokenizer_cost [--tokenizer DIR] [--max-len 128] [--out DIR]

Texts: the fast-path benchmark's single-item text (one sentence repeated: every word cached after
the first text), and varied texts of 100 words drawn from the tokenizer's own vocabulary with
suffixes, so a cold cache misses on nearly every word. Prints a table and writes tokenize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional


def per_text_us(fn: Callable[[str], object], texts: list[str], rounds: int) -> float:
    """Median over rounds of the mean microseconds per text."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for t in texts:
            fn(t)
        times.append((time.perf_counter() - t0) / len(texts) * 1e6)
    return sorted(times)[len(times) // 2]


def varied_texts(vocab_file: Path, n: int, words: int, seed: int = 0) -> list[str]:
    vocab = [w for w in vocab_file.read_text(encoding="utf-8").split() if w.isascii() and w.isalpha()]
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) + rng.choice(["", "s", "ing", "ed", ","]) for _ in range(words))
            for _ in range(n)]


def measure(tokenizer_dir: Path, max_len: int) -> dict:
    from tokenizers import Tokenizer

    from bench.harness import TEXT
    from app.models.wordpiece import AsciiWordPiece

    path = tokenizer_dir / "tokenizer.json"
    rust = Tokenizer.from_file(str(path))
    rust.no_padding()
    rust.enable_truncation(max_len)
    varied = varied_texts(tokenizer_dir / "vocab.txt", 300, 100)
    rows = []
    for name, texts in [("bench text", [TEXT] * 300), ("varied", varied)]:
        fast = AsciiWordPiece.from_file(Tokenizer.from_file(str(path)), str(path), 65_536)
        assert fast is not None, f"{path}: not a BERT-style WordPiece tokenizer"
        assert all(fast.encode(t, max_len) == rust.encode(t).ids for t in texts[:50])
        fast._cache.clear()
        cold = per_text_us(lambda t: fast.encode(t, max_len), texts, 1)  # each word a miss once
        row = {"texts": name, "tokens": len(rust.encode(texts[0]).ids),
               "rust_us": per_text_us(lambda t: rust.encode(t).ids, texts, 5),
               "fast_cold_us": cold, "fast_warm_us": per_text_us(lambda t: fast.encode(t, max_len), texts, 5),
               "distinct_words": len(fast._cache)}
        row["speedup_warm"] = row["rust_us"] / row["fast_warm_us"]
        row["speedup_cold"] = row["rust_us"] / row["fast_cold_us"]
        rows.append(row)
    return {"tokenizer": str(tokenizer_dir), "max_len": max_len, "rows": rows}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", help="directory with tokenizer.json and vocab.txt (default: the packaged MiniLM's)")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    ns = p.parse_args(argv)
    if ns.tokenizer:
        directory = Path(ns.tokenizer)
    else:
        from app.config import ModelSpec
        from app.models.loader import tokenizer_dir

        directory = tokenizer_dir(ModelSpec.model_validate({"name": "m", "source": {"kind": "packaged"}, "task": "embed"}))
    res = measure(directory, ns.max_len)
    print(f"{'texts':<11}{'tokens':>7}{'rust us':>9}{'cold us':>9}{'warm us':>9}{'x warm':>8}{'x cold':>8}")
    for r in res["rows"]:
        print(f"{r['texts']:<11}{r['tokens']:>7}{r['rust_us']:>9.0f}{r['fast_cold_us']:>9.0f}{r['fast_warm_us']:>9.0f}"
              f"{r['speedup_warm']:>8.1f}{r['speedup_cold']:>8.1f}")
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenize.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
