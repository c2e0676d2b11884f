"""Merge methods: how theta_0 and the distribution vectors make one candidate model.

Each method is two steps, shared by `ResidentMerge` and `merge_to_dir` so that the
evaluator scores exactly the model that `merge` later writes:

- `prepare(tensor, ...)`: once per vector and tensor, when it is read (trim, DARE);
- `combine(base, stacked, weights, ...)`: once per candidate, over a flat run of elements.

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Elements per chunk where `combine` needs scratch (mixed dtypes, the ties combination).
DEFAULT_CHUNK = 1 << 22


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
    """Buffers `combine` reuses from call to call, so a candidate allocates nothing big.

    Runs are processed in chunks of `chunk` elements: a k x chunk copy in the weights'
    dtype where the vectors are stored in another dtype, and for the ties combination a
    k x chunk agreement matrix plus three chunk-long vectors.
    """

    def __init__(
        self,
        method: str,
        k: int,
        chunk: int,
        dtype: torch.dtype,
        device: torch.device | str,
        vector_dtype: torch.dtype,
    ) -> None:
        self.chunk = max(1, chunk)
        self.convert = None
        if vector_dtype != dtype:
            self.convert = torch.empty((k, self.chunk), dtype=dtype, device=device)
        self.elect = METHODS[method].elect
        if self.elect:
            self.agree = torch.empty(k * self.chunk, dtype=dtype, device=device)
            self.sign = torch.empty(self.chunk, dtype=dtype, device=device)
            self.num = torch.empty(self.chunk, dtype=dtype, device=device)
            self.fill = torch.empty(self.chunk, dtype=dtype, device=device)


def combine(
    base: torch.Tensor,
    stacked: torch.Tensor,
    weights: torch.Tensor,
    method: str,
    out: torch.Tensor,
    scratch: Scratch | None = None,
) -> None:
    """out = the method's merge of base (n,) with prepared vectors stacked (k, n).

    `weights` (k,) and `out` are in the weights' dtype; `stacked` may be in another
    (converted chunk by chunk). linear with one dtype is a single addmv over the run.
    """
    elect = METHODS[method].elect
    n = base.numel()
    if n == 0:
        return
    if not elect and stacked.dtype == out.dtype:
        torch.addmv(base, stacked.t(), weights, out=out)
        return
    if scratch is None:
        k = stacked.shape[0]
        scratch = Scratch(method, k, min(n, DEFAULT_CHUNK), out.dtype, out.device, stacked.dtype)
    total = weights.sum() if elect else None
    for start in range(0, n, scratch.chunk):
        end = min(start + scratch.chunk, n)
        vectors = stacked[:, start:end]
        if scratch.convert is not None:
            converted = scratch.convert[:, : end - start]
            converted.copy_(vectors)
            vectors = converted
        if elect:
            _ties_chunk(base[start:end], vectors, weights, total, out[start:end], scratch)
        else:
            torch.addmv(base[start:end], vectors.t(), weights, out=out[start:end])


def _ties_chunk(
    base: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    total: torch.Tensor,
    out: torch.Tensor,
    s: Scratch,
) -> None:
    """base + (sum_i w_i a_i t_i) * (sum_i w_i) / (sum_i w_i a_i), 0 where no entry agrees.

    a_i: t_i agrees with the elected sign g = sign(sum_i w_i t_i), i.e. t_i * g > 0.
    With equal weights lambda / k this is lambda times the paper's disjoint mean; where
    every vector agrees it is the linear sum. Written with float ops only (relu, sign):
    bool masks cost more than the rest of the chunk together on CPU.
    """
    k, c = vectors.shape
    sign, num, fill = s.sign[:c], s.num[:c], s.fill[:c]
    agree = s.agree[: k * c].view(k, c)
    torch.mv(vectors.t(), weights, out=sign)
    torch.sign(sign, out=sign)
    torch.mul(vectors, sign, out=agree)
    agree.clamp_min_(0)  # |t_i| where t_i agrees, else 0
    torch.mv(agree.t(), weights, out=num)
    num.mul_(sign)  # sum_i w_i a_i t_i: the agreeing entries all carry the sign g
    agree.sign_()  # a_i as 0 / 1
    den = sign  # the sign is used up: its buffer takes sum_i w_i a_i (>= 0)
    torch.mv(agree.t(), weights, out=den)
    torch.sign(den, out=fill)
    fill.neg_().add_(1)  # 1 where nothing agrees (there num is 0 too), else 0
    den.add_(fill)
    torch.div(num, den, out=num)
    num.mul_(total)
    torch.add(base, num, out=out)
