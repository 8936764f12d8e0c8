"""Per-request sampling inside transformers' continuous batching, reproducible by seed.

transformers' continuous-batching manager samples every sequence of a step with one
`torch.multinomial` over the process's global generator, and `do_sample` is one flag for the whole
manager: a request's tokens would depend on which other requests shared its steps, and greedy and
sampled requests could not share a batch. Here the manager always takes the argmax, and sampling is
done before it with the Gumbel-max trick: argmax(logits / T + g) with g ~ Gumbel(0, 1) is a draw
from softmax(logits / T). The noise comes from a counter-based hash of (seed, token position,
vocabulary index), not from a generator's state, so a request with a seed gets the same tokens in
any batch, on any run, in any process that computes the same logits (every rank of a
tensor-parallel gang, every strategy). A request without temperature (T = 0) gets no noise: greedy.

The three processors plug into the manager's own per-request processor API
(`ContinuousBatchingLogitsProcessor`: one int32 argument row per processor, filled per step).
They run inside the manager's forward step. A processor skips its pass when no row of the step
needs it (a pass over [rows, vocab] is ~10 % of a CPU step; on a GPU each pass is several kernel
launches on a step that is bound by launching): the step's rows are known on the host when their arguments are prepared, so the
decision reads no device value (which would stall the host until the GPU catches up). A CUDA graph,
torch.compile or the manager's asynchronous batch preparation cannot take a per-step decision; for
them (`static_passes=True`) every pass runs, masked per row, with the same bits.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor, ContinuousBatchingLogitsProcessorList)

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding 32-bit values, in two 16-bit halves so that no
    product leaves int64 (signed overflow is not defined behaviour in torch's kernels)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (Chris Wellons' lowbias32) on int64 tensors: the same bits on any device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash32_int(x: int) -> int:
    """hash32 on one Python int (a step key per request per step: no tensor ops on the host)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def step_key(seed: int, position: int) -> int:
    """A non-negative int32 key for the noise of one request's `position`-th generated token."""
    h = _hash32_int((seed & _MASK32) ^ _hash32_int(((seed >> 32) & _MASK32) ^ _hash32_int((position & _MASK32) + 0x9E3779B9)))
    return h & 0x7FFFFFFF


def gumbel_noise(keys: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise [len(keys), vocab], a pure function of each row's key."""
    idx = hash32(torch.arange(vocab, dtype=torch.int64, device=device) + 0x632BE5AB)
    # Two rounds: one round of the mixer on (key xor column) left small seeds' draws correlated
    # (a chi-square test over seeds 0..5999 failed at p < 1e-4; 200,000 seeds passed).
    h = hash32(hash32(keys.to(device=device, dtype=torch.int64).unsqueeze(-1) ^ idx.unsqueeze(0)) + 0x5BD1E995)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), exact in float32
    return -torch.log(-torch.log(u))


class _FloatArg(ContinuousBatchingLogitsProcessor):
    """A processor whose per-request argument is one float (default 1.0), carried as int32 bits."""

    key: str
    ignored_kwargs = ()
    default = 1.0  # the value whose pass is a no-op

    def __init__(self, static_passes: bool = False):
        super().__init__()
        self.static_passes = static_passes
        self.needed = True  # set per step by prepare_tensor_args: does any row need this pass?

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(torch.ones_like(int32_tensor, dtype=torch.float32).view(torch.int32))

    def value(self, kwargs: dict[str, Any]) -> float:
        return kwargs.get(self.key, 1.0)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        values = [self.value(r.state.logit_processor_kwargs) for r in requests_with_new_token]
        self.needed = self.static_passes or any(v != self.default for v in values)
        return torch.tensor(values, dtype=torch.float32).view(torch.int32)


class _Temperature(_FloatArg):
    key = "temperature"
    supported_kwargs = {"temperature": float}

    def value(self, kwargs: dict[str, Any]) -> float:
        # Greedy rows (T = 0) are left unscaled: no noise is added to them.
        return kwargs.get("temperature", 0.0) or 1.0

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if not self.needed:  # greedy or T = 1: nothing to scale
            return scores
        t = tensor_arg[: scores.size(0)].view(torch.float32)
        return scores / t.to(device=scores.device, dtype=scores.dtype).unsqueeze(-1)  # x / 1.0 is x exactly


class _TopP(_FloatArg):
    key = "top_p"
    supported_kwargs = {"top_p": float}

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if not self.needed:  # every row keeps its whole distribution
            return scores
        p = tensor_arg[: scores.size(0)].view(torch.float32).to(scores.device)
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token once the tokens before it already hold p of the mass (the top one always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= p.unsqueeze(-1)
        # Rows with p >= 1 keep every token (a cumulative sum can round past 1.0 before the tail).
        drop_sorted &= (p < 1.0).unsqueeze(-1)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return scores.masked_fill(drop, float("-inf"))


class _SeededNoise(ContinuousBatchingLogitsProcessor):
    supported_kwargs = {"seed": int}
    ignored_kwargs = ()

    def __init__(self, static_passes: bool = False):
        super().__init__()
        self.static_passes = static_passes
        self.needed = True

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        keys = []
        for r in requests_with_new_token:
            kw = r.state.logit_processor_kwargs
            sampled = kw.get("temperature", 0.0) > 0.0
            keys.append(step_key(kw["seed"], len(r.state.generated_tokens)) if sampled else -1)
        self.needed = self.static_passes or any(k >= 0 for k in keys)
        return torch.tensor(keys, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if not self.needed:  # every row greedy
            return scores
        keys = tensor_arg[: scores.size(0)]
        sampled = keys >= 0
        noise = gumbel_noise(keys, scores.size(-1), scores.device).to(scores.dtype)
        return torch.where(sampled.to(scores.device).unsqueeze(-1), scores + noise, scores)


def seeded_sampling_processors(static_passes: bool = False) -> ContinuousBatchingLogitsProcessorList:
    """The processor list to hand the manager (with `do_sample=False`): temperature, top-p, noise.
    `static_passes`: every pass every step (for CUDA graphs, compile, asynchronous batching)."""
    processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList(
        [_Temperature(static_passes), _TopP(static_passes), _SeededNoise(static_passes)]))
    processors.tensors_required = 3  # one argument row each (the list counts only processors it converts)
    return processors


def sampling_kwargs(temperature: float, top_p: float, seed: int) -> dict[str, Any]:
    """What a request carries into the manager (`add_request(**kwargs)`), in the processors' types."""
    return {"temperature": float(temperature), "top_p": float(top_p), "seed": int(seed)}


def reference_sample(logits: torch.Tensor, temperature: float, top_p: float, seed: int, position: int) -> int:
    """The token the processors pick for one row of logits (for tests and for checking a runner
    that does not run inside the manager)."""
    class _Req:
        def __init__(self):
            self.state = type("S", (), {"logit_processor_kwargs": sampling_kwargs(temperature, top_p, seed),
                                        "generated_tokens": [0] * position})()

    reqs = [_Req()]
    scores = logits.float().unsqueeze(0)
    for proc in (_Temperature(), _TopP(), _SeededNoise()):
        scores = proc(scores, proc.prepare_tensor_args(reqs))
    return int(scores.argmax(dim=-1))

