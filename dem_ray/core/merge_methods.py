"""Merge methods: how theta_0 and the distribution vectors make one candidate model.

Each method is two steps, shared by `ResidentMerge` and `merge_to_dir` so that the
evaluator scores exactly the model that `merge` later writes:

- `prepare(tensor, ...)`: once per vector and tensor, when it is read (trim, DARE);
- `combine(base, stacked, weights, ...)`: once per candidate, over a flat run of elements,
  in float32 whatever the dtypes (see `combine`), then cast to the model's dtype: the
  live weights an evaluator scores are, bit for bit, the tensors `merge` writes.

    linear       theta_0 + sum_i w_i v_i                              (the DEM merge)
    ties         TIES-Merging (Yadav et al. 2023): trim each vector to its top `density`
                 by magnitude, elect a sign per element, merge the agreeing entries only
    dare_linear  DARE (Yu et al. 2023): drop each entry with probability 1 - density,
                 rescale the kept ones by 1 / density, then linear
    dare_ties    DARE's drop-and-rescale, then the ties combination

Pure torch; the DARE masks come from a CPU generator seeded by name, so they do not
depend on the device, on the order tensors are read in, or on the other tensors.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Elements per chunk of `combine` (its float32 scratch buffers hold one chunk each).
DEFAULT_CHUNK = 1 << 18


class MergeError(ValueError):
    """Weights, vectors or merge settings that cannot be merged; the message says which."""


@dataclass(frozen=True)
class Method:
    name: str
    prepare: str  # "none", "trim" (TIES) or "dare"
    elect: bool  # True: the ties combination (sign election + disjoint merge)
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", "none", False, "theta_0 + sum_i w_i v_i"),
        Method("ties", "trim", True, "trim to top density, elect signs, disjoint merge"),
        Method("dare_linear", "dare", False, "drop with p = 1 - density, rescale, linear"),
        Method("dare_ties", "dare", True, "drop with p = 1 - density, rescale, ties combine"),
    )
}


def check_method(method: str, density: float) -> Method:
    """The registered method, or a MergeError naming what is wrong with the settings."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; known methods: {', '.join(METHODS)}")
    if (
        isinstance(density, bool)
        or not isinstance(density, int | float)
        or not math.isfinite(density)
        or not 0 < density <= 1
    ):
        raise MergeError(
            f"density {density!r} is not in (0, 1]: it is the fraction of each vector's "
            "entries that ties and DARE keep (1 keeps them all)"
        )
    return METHODS[method]


def check_weights(method: str, weights: Sequence[float]) -> list[float]:
    """The weights as floats; finite, and non-negative for the ties methods."""
    out = [float(w) for w in weights]
    for w in out:
        if not math.isfinite(w):
            raise MergeError(f"weight {w} is not a finite number")
    if METHODS[method].elect and any(w < 0 for w in out):
        bad = next(w for w in out if w < 0)
        raise MergeError(
            f"weight {bad} is negative, but the ties methods ({method}) need non-negative "
            "weights: the elected sign and the disjoint mean assume them (use a simplex, "
            "or a box with low >= 0)"
        )
    return out


def keep_count(numel: int, density: float) -> int:
    """ceil(density * numel), at least 1; float noise rounded off first (0.7 of 10 keeps 7)."""
    return max(1, math.ceil(round(density * numel, 6)))


def dare_seed_of(dare_seed: int, dataset: str, tensor_name: str) -> int:
    """The generator seed of one tensor's DARE mask: sha256 of 'seed/dataset/tensor'."""
    digest = hashlib.sha256(f"{dare_seed}/{dataset}/{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def dare_mask(
    shape: torch.Size, density: float, dare_seed: int, dataset: str, tensor_name: str
) -> torch.Tensor:
    """Which entries DARE keeps (True with probability `density`), drawn on the CPU."""
    gen = torch.Generator(device="cpu").manual_seed(dare_seed_of(dare_seed, dataset, tensor_name))
    numel = math.prod(shape)
    return (torch.rand(numel, generator=gen, dtype=torch.float32) < density).reshape(shape)


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim in float32: keep the top ceil(density * numel) entries by magnitude.

    Entries tied with the threshold are all kept; zeros never count as kept.
    """
    flat = tensor.reshape(-1).to(torch.float32)
    numel = flat.numel()
    keep = keep_count(numel, density)
    if keep >= numel:
        return tensor.to(torch.float32)
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, numel - keep + 1).values  # the keep-th largest
    kept = (magnitude >= threshold) & (flat != 0)
    return torch.where(kept, flat, 0.0).view(tensor.shape)


def prepare(
    tensor: torch.Tensor,
    method: str,
    density: float,
    dare_seed: int,
    dataset: str,
    tensor_name: str,
) -> torch.Tensor:
    """One vector's tensor as the method combines it (done once, when it is read).

    linear, and any method at density 1, return `tensor` itself; the others return it in
    float32, for the caller to store in the vector dtype.
    """
    kind = check_method(method, density).prepare
    if kind == "none" or density == 1:
        return tensor
    if kind == "trim":
        return trim(tensor, density)
    mask = dare_mask(tensor.shape, density, dare_seed, dataset, tensor_name)
    values = tensor.to(torch.float32)
    return torch.where(mask.to(values.device), values / density, 0.0)


class Scratch:
    """float32 buffers `combine` reuses from call to call, so a candidate allocates nothing big.

    Runs are combined in chunks of `chunk` elements; each buffer holds one chunk: the k
    weighted terms (k x chunk), the vectors upcast (k x chunk, where they are not float32),
    the base upcast (where it is not float32), the result before its cast to the output's
    dtype (where that is not float32), and for the ties combination the agreement
    (k x chunk), sign, numerator and denominator. A buffer `combine` needs but was not told
    of is made on first use and kept.
    """

    def __init__(
        self,
        method: str,
        k: int,
        chunk: int,
        dtype: torch.dtype,
        device: torch.device | str,
        vector_dtype: torch.dtype,
        base_dtype: torch.dtype | None = None,
    ) -> None:
        """`dtype`: the output's (the model's); `base_dtype`: theta_0's (default `dtype`)."""
        self.chunk = max(1, chunk)
        self.device = torch.device(device)
        self.k = k
        self.elect = METHODS[method].elect
        self._buffers: dict[str, torch.Tensor] = {}
        self._weights = torch.empty((k, 1), dtype=torch.float32, device=self.device)
        wanted = ["terms"]
        wanted += ["base"] * ((base_dtype or dtype) != torch.float32)
        wanted += ["vectors"] * (vector_dtype != torch.float32)
        wanted += ["result"] * (dtype != torch.float32)
        wanted += ["agree", "sign", "num", "den"] * self.elect
        for name in wanted:
            self.buffer(name)

    def buffer(self, name: str) -> torch.Tensor:
        if name not in self._buffers:
            rows = (self.k,) if name in ("terms", "vectors", "agree") else ()
            shape = (*rows, self.chunk)
            self._buffers[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
        return self._buffers[name]

    def weights(self, ws: list[float]) -> torch.Tensor:
        """The k weights as a (k, 1) float32 column on the device (one copy per call)."""
        if self._weights.shape[0] != len(ws):
            self._weights = torch.empty((len(ws), 1), dtype=torch.float32, device=self.device)
        self._weights.copy_(torch.tensor(ws, dtype=torch.float32).view(-1, 1))
        return self._weights


def to_float32(value: float) -> float:
    """`value` rounded to the nearest float32, as a Python float (so exactly a float32)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def float32_weights(weights: torch.Tensor | Sequence[float]) -> list[float]:
    """The weights as `combine` multiplies by them: each rounded to float32 once."""
    values = weights.tolist() if isinstance(weights, torch.Tensor) else weights
    return [to_float32(float(w)) for w in values]


def combine(
    base: torch.Tensor,
    stacked: torch.Tensor,
    weights: torch.Tensor | Sequence[float],
    method: str,
    out: torch.Tensor,
    scratch: Scratch | None = None,
) -> None:
    """out = the method's merge of base (n,) with prepared vectors stacked (k, n).

    The one arithmetic of every merge (the evaluators' `ResidentMerge` and `merge_to_dir`):
    chunk by chunk, theta_0 and the vectors are upcast to float32, the weights rounded to
    float32, the merge computed in float32 and cast to `out`'s dtype (round to nearest
    even). Each step is an elementwise multiply or add, each rounded once (no fused
    multiply-add, no matrix product whose blocking could change the order of the sums),
    so an element's value depends on its own inputs only: not on the chunking, the
    alignment in memory, the thread count or the device. `base`, `stacked` and `out` may
    each be float32, bfloat16 or float16.
    """
    elect = METHODS[method].elect
    n = base.numel()
    if n == 0:
        return
    ws = float32_weights(weights)
    if scratch is None:
        scratch = Scratch(method, len(ws), min(n, DEFAULT_CHUNK), out.dtype, out.device,
                          stacked.dtype, base.dtype)  # fmt: skip
    total = None
    if elect:  # sum_i w_i, in float32 in order (the same in every process)
        total = 0.0
        for w in ws:
            total = to_float32(total + w)
    column = scratch.weights(ws)
    for start in range(0, n, scratch.chunk):
        end = min(start + scratch.chunk, n)
        b = _float32(base[start:end], scratch, "base")
        vectors = _float32(stacked[:, start:end], scratch, "vectors")
        target = out[start:end]
        result = target if out.dtype == torch.float32 else scratch.buffer("result")[: end - start]
        if elect:
            _ties_chunk(b, vectors, column, total, result, scratch)
        else:
            _linear_chunk(b, vectors, column, result, scratch)
        if result is not target:
            target.copy_(result)


def _float32(part: torch.Tensor, s: Scratch, name: str) -> torch.Tensor:
    """`part` itself when float32, else upcast (exactly) into scratch buffer `name`."""
    if part.dtype == torch.float32:
        return part
    buffer = s.buffer(name)[..., : part.shape[-1]]
    buffer.copy_(part)
    return buffer


def _row_sum(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """rows[0] + rows[1] + ..., left to right, each sum rounded once; into `out`, or into
    rows[0] (which it overwrites) when no `out` is given."""
    acc = rows[0] if out is None else out.copy_(rows[0])
    for i in range(1, rows.shape[0]):
        acc.add_(rows[i])
    return acc


def _linear_chunk(
    base: torch.Tensor, vectors: torch.Tensor, column: torch.Tensor, out: torch.Tensor, s: Scratch
) -> None:
    """out = base + (w_0 t_0 + w_1 t_1 + ...): each product and each sum rounded once."""
    terms = s.buffer("terms")[:, : base.numel()]
    torch.mul(vectors, column, out=terms)
    torch.add(base, _row_sum(terms), out=out)


def _ties_chunk(
    base: torch.Tensor,
    vectors: torch.Tensor,
    column: torch.Tensor,
    total: float,
    out: torch.Tensor,
    s: Scratch,
) -> None:
    """base + (sum_i w_i a_i t_i) * (sum_i w_i) / (sum_i w_i a_i), 0 where no entry agrees.

    a_i: t_i agrees with the elected sign g = sign(sum_i w_i t_i), i.e. t_i * g > 0.
    With equal weights lambda / k this is lambda times the paper's disjoint mean; where
    every vector agrees it is the linear sum. Written with float ops only (relu, sign):
    bool masks cost more than the rest of the chunk together on CPU.
    """
    c = base.numel()
    sign, num, den = s.buffer("sign")[:c], s.buffer("num")[:c], s.buffer("den")[:c]
    terms, agree = s.buffer("terms")[:, :c], s.buffer("agree")[:, :c]
    torch.mul(vectors, column, out=terms)
    _row_sum(terms, sign).sign_()  # the elected sign g
    torch.mul(vectors, sign, out=agree)
    agree.clamp_min_(0)  # |t_i| where t_i agrees, else 0
    torch.mul(agree, column, out=terms)
    _row_sum(terms, num).mul_(sign)  # sum_i w_i a_i t_i: the agreeing entries carry g
    agree.sign_().mul_(column)  # w_i a_i
    _row_sum(agree, den)  # sum_i w_i a_i (>= 0)
    fill = sign  # used up: 1 where nothing agrees (there num is 0 too), else 0
    torch.sign(den, out=fill)
    fill.neg_().add_(1)
    den.add_(fill)
    num.div_(den)
    num.mul_(total)
    torch.add(base, num, out=out)
