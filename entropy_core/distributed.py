"""Rank-aware measurement: E and U split across torch.distributed ranks, estimators over every sequence.

    torchrun --nproc_per_node=8 -m entropy_core.measure --config C.yaml   # one process per GPU (nccl); gloo on CPU

Every estimate is a smooth function of sums over the sequences of E (DESIGN §1.5), and the update is a
sum over the sequences of U (DESIGN §1.1), so splitting work by sequences changes nothing but the
order of additions:

* E: rank r scores its own rows of E (`shard_rows`: contiguous or strided, deterministic). The
  per-token S_{i,k}, H_{i,k} (and D_vS, D_vH, D²S, D²H from the JVP pass) are all-gathered into the
  full (N, L) TokenScores on EVERY rank, and the single-process estimators (`snis_delta`,
  `entropy_base`, `slope_exact`, `curvature_exact`, `finite_difference`, `slope_variance_reduced`)
  run on them unchanged: the same numbers and the same jackknife standard errors as one process.
  Tokens, not per-sequence sums, travel because the variance-reduced slope pools the entropy-to-go
  of all sequences at each response position (DESIGN §1.4). That is N·L float64 per quantity
  (16 MiB for B_E = 2048, L = 1024), the size of one scores artifact.
* U: rank r takes whole prompt groups (`shard_groups`). The Dr.GRPO coefficients
  c_i = −A_i / (B_U · G_b · L_max(b)) are computed from the FULL batch's groups (so 1/B_U is the
  global B_U, trap §2.6), each rank backpropagates Σ_{i∈rank} c_i S_i in float64, and the gradients
  are all-reduced (SUM). Every rank then applies the same AdamW arithmetic to the same g, so v is
  identical on every rank and equal to the single-process v up to the order of the float64 sum.

Sampling per rank (`rank_seed`, `sample_E_shard`): rank r of W draws its n_r = len(shard_rows(B_E, r, W))
sequences of E with seed `rank_seed(seed, r)`, and its rows sit at the global positions
shard_rows(B_E, r, W, mode="contiguous"). The union is therefore reproducible for a given (seed, W):
rerunning rank r alone with the same arguments redraws exactly its rows. A different W gives a
different, equally valid sample (the single-process E is the W = 1 case, seed rank_seed(seed, 0)).

Two ways to hand a batch to the functions below:
* full (default): every rank holds the same whole batch (e.g. read from the same artifact) and each
  scores rows `shard_rows(N, mode=shard)`;
* local: pass `index=` (the global rows this rank holds, e.g. from `sample_E_shard`) and the batch
  holds only those rows; per-sequence extras (logq, groups) are then local too and are gathered.
Results are full-batch objects on every rank. Without torch.distributed initialised (or with one
rank) everything reduces to the plain single-process calls. `run_on_rank0` runs work that only one
process should do (sampling, writing an artifact) on rank 0 and hands its result to every rank. Collectives run on CPU tensors for gloo
and on the current CUDA device for nccl. No Prefect here.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .estimators.linear import LinearResult, linear_from_passes
from .estimators.true_delta import TrueDeltaResult, batch_tensors, entropy_base, ess, log_proposal_ratio, snis_delta
from .params import get_optimizer_named_params
from .scoring import TokenScores, check_batch, jvp_scores, score_tokens, scoring_sharing
from .update import UpdateResult, _check_state, accumulate_gradient, drgrpo_coefficients, update_from_gradient

__all__ = [
    "ShardError", "RankZeroError", "rank_and_world", "run_on_rank0", "init_distributed", "shard_rows", "shard_groups", "local_index", "rank_seed",
    "all_gather_rows", "all_reduce_sum", "broadcast_text", "gather_token_scores", "take_rows", "sample_E_shard",
    "distributed_score_tokens", "distributed_jvp_scores", "distributed_true_delta",
    "distributed_linear_estimates", "distributed_gradient", "distributed_update_vector",
]

_SHARD_MODES = ("contiguous", "strided")
# How long a rank waits in a collective: rank 0 may sample E alone while the others wait (≈500 s at
# B_E = 2048, DESIGN §4), past NCCL's 10-minute default.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
T = TypeVar("T")


class ShardError(ValueError):
    """Ranks disagree about a batch: rows missing or claimed twice, or mismatched shapes. Not retried."""


class RankZeroError(RuntimeError):
    """Rank 0 failed in work that only it does; the other ranks stop with its message."""


# ------------------------------------------------------------------------------------------------ ranks
def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: str | None = None, *, timeout: timedelta = COLLECTIVE_TIMEOUT) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment).

    backend None: nccl when CUDA is available (each rank then uses GPU LOCAL_RANK), else gloo. Without
    WORLD_SIZE in the environment (a plain `python` run) nothing is initialised. Call once, at the
    entry point; returns (rank, world size).
    """
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return rank_and_world()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return rank_and_world()


def run_on_rank0(fn: Callable[[], T], *, encode: Callable[[T], Any], decode: Callable[[Any], T]) -> T:
    """fn() on rank 0 only; every other rank gets decode(encode(result)), sent as JSON text. One process: fn().

    The other ranks wait in the broadcast, which also orders them after whatever rank 0 wrote (an
    artifact they then read). An exception on rank 0 propagates there and is raised on the others as
    RankZeroError with its message, so no rank waits for a result that will not come.
    """
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    if rank == 0:
        try:
            out = fn()
        except BaseException as e:
            broadcast_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        broadcast_text(json.dumps({"result": encode(out)}))
        return out
    msg = json.loads(broadcast_text(None))
    if "error" in msg:
        raise RankZeroError(f"rank 0 failed: {msg['error']}")
    return decode(msg["result"])


def _comm_device() -> torch.device:
    # nccl moves CUDA tensors only; gloo CPU tensors (it has CUDA support too, but CPU is what we hold)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ shards
def shard_rows(n: int, rank: int | None = None, world: int | None = None, *, mode: str = "contiguous"
               ) -> torch.Tensor:
    """Global row indices of rank `rank` among `world` for a batch of n rows (defaults: this process).

    contiguous: rows [⌊rn/W⌋ … ⌊(r+1)n/W⌋) (balanced to ±1 row; concatenation in rank order is
    0..n−1); strided: rows r, r+W, r+2W, … (balances sorted lengths). Returns (n_r,) int64.
    """
    if mode not in _SHARD_MODES:
        raise ValueError(f"shard mode must be one of {_SHARD_MODES}, got {mode!r}")
    r, w = rank_and_world()
    rank, world = (r if rank is None else rank), (w if world is None else world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    if mode == "strided":
        return torch.arange(rank, max(n, rank), world, dtype=torch.long)         # empty when rank ≥ n
    return torch.arange(rank * n // world, (rank + 1) * n // world, dtype=torch.long)


def shard_groups(group: torch.Tensor, rank: int | None = None, world: int | None = None, *,
                 mode: str = "contiguous") -> torch.Tensor:
    """Rows of the whole prompt groups assigned to this rank: the sorted distinct group labels are
    sharded with `shard_rows`, and every row of an assigned group follows it. Returns (m,) int64."""
    labels = torch.unique(group)                                        # sorted distinct labels
    mine = labels[shard_rows(len(labels), rank, world, mode=mode)]
    return torch.isin(group, mine).nonzero().flatten()


def local_index(n_local: int) -> tuple[torch.Tensor, int]:
    """Global rows of this rank's n_local rows when every rank holds its own rows (e.g. sampled per
    rank): rank r's rows follow those of ranks < r. Returns (index (n_local,) int64, total n)."""
    counts = _all_gather_tensor(torch.tensor([n_local], dtype=torch.long))
    rank, _ = rank_and_world()
    start = int(sum(int(c) for c in counts[:rank]))
    return torch.arange(start, start + n_local, dtype=torch.long), int(sum(int(c) for c in counts))


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The 31-bit seed of this rank's share of a sampled batch: sha256('<seed>:rank<r>'). Deterministic
    across processes and machines, so rank r redraws its rows alone; see the module docstring."""
    r = rank_and_world()[0] if rank is None else rank
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:rank{int(r)}".encode()).digest()[:4], "little") >> 1


def take_rows(batch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of `batch` (a mapping or BatchedSequences) whose first dim is the batch, at `rows`."""
    keys = list(batch.keys())
    n = batch_tensors(batch)[0].shape[0]
    return {k: batch[k][rows] for k in keys if isinstance(batch[k], torch.Tensor) and batch[k].dim() >= 1
            and batch[k].shape[0] == n}


def sample_E_shard(processor, examples: Sequence, B_E: int, *, seed: int):
    """This rank's share of E: `processor.sample_E(examples, n_r, seed=rank_seed(seed))`.

    Returns: (BatchedSequences of this rank's n_r rows, their global index (n_r,), B_E). Pass both to
    the distributed_* functions (batch=..., index=...).
    """
    rank, world = rank_and_world()
    n_r = len(shard_rows(B_E, rank, world))
    if n_r == 0:
        raise ValueError(f"B_E={B_E} is smaller than the {world} ranks: rank {rank} would sample nothing")
    batch = processor.sample_E(examples, n_r, seed=rank_seed(seed, rank))
    index, n = local_index(n_r)
    return batch, index, n


# ------------------------------------------------------------------------------------------------ collectives
def _all_gather_tensor(x: torch.Tensor) -> list[torch.Tensor]:
    """x from every rank (shapes may differ in every dim; the number of dims may not), on CPU."""
    _, world = rank_and_world()
    if world == 1:
        return [x.cpu()]
    dev = _comm_device()
    shape = torch.tensor(x.shape, dtype=torch.long, device=dev)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [tuple(int(s) for s in sh.cpu()) for sh in shapes]
    if len({len(s) for s in shapes}) != 1:
        raise ShardError(f"ranks hold tensors of different ranks (shapes {shapes}); they must agree on ndim")
    top = tuple(max(dims) for dims in zip(*shapes))
    wire = x.to(torch.long) if x.dtype == torch.bool else x              # bool is not a gloo dtype
    padded = torch.zeros(top, dtype=wire.dtype, device=dev)
    padded[tuple(slice(0, s) for s in x.shape)] = wire.to(dev)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[tuple(slice(0, s) for s in sh)].to(x.dtype).cpu() for o, sh in zip(out, shapes)]


def all_gather_rows(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """The full (n, ...) tensor from every rank's rows x (n_r, ...) at global positions index (n_r,).

    Trailing dims may differ between ranks (e.g. each rank's own padded length L_r): the result has
    the largest, zero-filled on the right, which leaves masked per-token tensors meaning the same.
    Raises: ShardError naming rows that no rank or several ranks hold.
    """
    parts, idx = _all_gather_tensor(x), _all_gather_tensor(index.long())
    seen = torch.cat(idx)
    count = torch.zeros(n, dtype=torch.long).index_add_(0, seen.clamp(0, max(n - 1, 0)), torch.ones_like(seen))
    missing, twice = (count == 0).nonzero().flatten(), (count > 1).nonzero().flatten()
    if len(seen) != n or len(missing) or len(twice) or (len(seen) and (seen.min() < 0 or seen.max() >= n)):
        raise ShardError(f"ranks do not cover rows 0..{n - 1} exactly once: {len(seen)} rows gathered, "
                         f"missing {missing[:10].tolist()}, held by several ranks {twice[:10].tolist()}")
    trail = tuple(max(dims) for dims in zip(*(p.shape[1:] for p in parts))) if x.dim() > 1 else ()
    out = torch.zeros((n, *trail), dtype=x.dtype)
    for p, i in zip(parts, idx):
        out[(i, *(slice(0, s) for s in p.shape[1:]))] = p
    return out


def all_reduce_sum(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Σ over ranks of each tensor (same names and shapes on every rank), in float64, on the input's device.

    One flat buffer, so one collective; the reduction order is the backend's, fixed for a given world.
    """
    _, world = rank_and_world()
    names = list(tensors)
    if world == 1 or not names:
        return {n: tensors[n].double() for n in names}
    flat = torch.cat([tensors[n].double().reshape(-1) for n in names]).to(_comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, k = {}, 0
    for n in names:
        t = tensors[n]
        out[n] = flat[k:k + t.numel()].reshape(t.shape).to(t.device)
        k += t.numel()
    return out


def broadcast_text(text: str | None, src: int = 0) -> str:
    """`text` of rank `src` on every rank (e.g. the JSON of an ArtifactRef that only rank 0 computed), sent
    as UTF-8 bytes in a uint8 tensor (no pickle). Other ranks pass None."""
    rank, world = rank_and_world()
    if world == 1:
        return text
    dev = _comm_device()
    data = torch.tensor(list(text.encode("utf-8")) if rank == src else [], dtype=torch.uint8)
    size = torch.tensor([len(data)], dtype=torch.long, device=dev)
    dist.broadcast(size, src)
    buf = data.to(dev) if rank == src else torch.empty(int(size), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src)
    return bytes(buf.cpu().tolist()).decode("utf-8")


def gather_token_scores(local: TokenScores, index: torch.Tensor, n: int) -> TokenScores:
    """Full TokenScores (n, L) from every rank's rows (TokenScores of its n_r rows at `index`)."""
    return TokenScores(**{f.name: (all_gather_rows(getattr(local, f.name), index, n)
                                   if getattr(local, f.name) is not None else None) for f in fields(local)})


# ------------------------------------------------------------------------------------------------ E
def _local_rows(batch, index: torch.Tensor | None, shard: str):
    """(input_ids, attention_mask, response_mask) of this rank's rows, their global index, and n."""
    ids, am, rm = batch_tensors(batch)
    if index is not None:
        if len(index) != ids.shape[0]:
            raise ShardError(f"index has {len(index)} rows, the local batch {ids.shape[0]}")
        n = int(all_reduce_sum({"n": torch.tensor(float(len(index)))})["n"])
        return (ids, am, rm), index.long(), n
    rows = shard_rows(ids.shape[0], mode=shard)
    return (ids[rows], am[rows], rm[rows]), rows, ids.shape[0]


def _full_per_sequence(x: torch.Tensor | None, index: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A per-sequence extra (logq, groups): as given in full mode, gathered in local mode."""
    if x is None or index is None:
        return x
    return all_gather_rows(x, index, n)


def _empty_scores(L: int, names: Sequence[str]) -> TokenScores:
    z = torch.zeros((0, L), dtype=torch.float64)
    return TokenScores(mask=torch.zeros((0, L), dtype=torch.bool), **{k: z.clone() for k in names})


def _whole_batch_sharing(model: torch.nn.Module, batch) -> dict:
    """score_tokens / jvp_scores keywords that make a shard share prompts as the whole batch does (the same
    root, or none), so that each row is computed exactly as in one process."""
    s = scoring_sharing(model, *batch_tensors(batch))
    return dict(share_prompts=False) if s is None else dict(prompt_root=s.root)


def distributed_score_tokens(model: torch.nn.Module, batch, *, v: Mapping[str, torch.Tensor] | None = None,
                             eta: float = 0.0, temperature: float = 1.0, microbatch_size: int | str = 8,
                             shard: str = "contiguous", index: torch.Tensor | None = None) -> TokenScores:
    """`score_tokens` of this rank's rows, all-gathered: S, H (N, L) float64 of the WHOLE batch, every rank.

    Args: batch: the full batch (every rank the same) or, with `index`, this rank's rows; shard: how
          full batches are split. The rest as score_tokens.
    Raises: ScoringError as score_tokens (naming the local row); ShardError when ranks disagree.
    """
    kw = _whole_batch_sharing(model, batch) if index is None else {}
    (ids, am, rm), index, n = _local_rows(batch, index, shard)
    if len(index):
        local = score_tokens(model, ids, am, rm, v=v, eta=eta, temperature=temperature,
                             microbatch_size=microbatch_size, **kw)
    else:                                                            # more ranks than rows
        local = _empty_scores(ids.shape[1], ("S", "H"))
    return gather_token_scores(local, index, n)


def distributed_jvp_scores(model: torch.nn.Module, batch, v: Mapping[str, torch.Tensor], *, order: int = 1,
                           temperature: float = 1.0, microbatch_size: int | str = 8, shard: str = "contiguous",
                           index: torch.Tensor | None = None) -> TokenScores:
    """`jvp_scores` of this rank's rows, all-gathered: S, H, dS, dH (and d2S, d2H) (N, L) on every rank."""
    kw = _whole_batch_sharing(model, batch) if index is None else {}
    (ids, am, rm), index, n = _local_rows(batch, index, shard)
    if len(index):
        local = jvp_scores(model, ids, am, rm, v, order=order, temperature=temperature,
                           microbatch_size=microbatch_size, **kw)
    else:
        local = _empty_scores(ids.shape[1], ("S", "H", "dS", "dH") + (("d2S", "d2H") if order == 2 else ()))
    return gather_token_scores(local, index, n)


def distributed_true_delta(model: torch.nn.Module, batch, v: Mapping[str, torch.Tensor], etas: Sequence[float], *,
                           temperature: float = 1.0, microbatch_size: int | str = 8,
                           logq: torch.Tensor | None = None, groups: torch.Tensor | None = None,
                           logw_clip: float | None = None, base_scores: TokenScores | None = None,
                           shard: str = "contiguous", index: torch.Tensor | None = None) -> TrueDeltaResult:
    """`estimators.true_delta` with E split across ranks: ΔĤ(η) ± se for every η (DESIGN §1.2).

    Each pass (θ once, θ+ηv per η) is `distributed_score_tokens`; the SNIS arithmetic then runs on the
    gathered per-sequence sums exactly as in one process. base_scores: a gathered θ pass to reuse.
    Returns: TrueDeltaResult over the whole batch, identical on every rank.
    """
    bad = [e for e in etas if e == 0 or not torch.isfinite(torch.tensor(float(e)))]
    if bad or not etas:
        raise ValueError(f"etas must be a non-empty list of finite non-zero step sizes, got {list(etas)}")
    kw = dict(temperature=temperature, microbatch_size=microbatch_size, shard=shard, index=index)
    n = None if index is None else int(all_reduce_sum({"n": torch.tensor(float(len(index)))})["n"])
    logq, groups = _full_per_sequence(logq, index, n), _full_per_sequence(groups, index, n)
    base_scores = base_scores if base_scores is not None else distributed_score_tokens(model, batch, **kw)
    base = base_scores.per_sequence()
    points, per_eta = [], []
    for eta in etas:
        shifted = distributed_score_tokens(model, batch, v=v, eta=eta, **kw).per_sequence()
        points.append(snis_delta(base, shifted, eta, logq=logq, groups=groups, logw_clip=logw_clip))
        per_eta.append(shifted)
    return TrueDeltaResult(H_base=entropy_base(base, logq=logq, groups=groups), points=points,
                           ess_proposal=ess(log_proposal_ratio(base.S, logq)), tokens=int(base.T.sum()),
                           sequences=int(base.T.numel()), base=base, per_eta=per_eta)


def distributed_linear_estimates(model: torch.nn.Module, batch, v: Mapping[str, torch.Tensor], *,
                                 quadratic: bool = True, variance_reduced: bool = True, fd_step: float | None = None,
                                 temperature: float = 1.0, microbatch_size: int | str = 8,
                                 logq: torch.Tensor | None = None, groups: torch.Tensor | None = None,
                                 base_scores: TokenScores | None = None, shard: str = "contiguous",
                                 index: torch.Tensor | None = None) -> LinearResult:
    """`estimators.linear_estimates` with E split across ranks (DESIGN §1.3, §1.4): the JVP pass and
    the ±fd_step passes are sharded and gathered per token, the estimators run on the whole batch."""
    kw = dict(temperature=temperature, microbatch_size=microbatch_size, shard=shard, index=index)
    n = None if index is None else int(all_reduce_sum({"n": torch.tensor(float(len(index)))})["n"])
    logq, groups = _full_per_sequence(logq, index, n), _full_per_sequence(groups, index, n)
    js = distributed_jvp_scores(model, batch, v, order=2 if quadratic else 1, **kw)
    fd = None
    if fd_step is not None:
        base = base_scores if base_scores is not None else distributed_score_tokens(model, batch, **kw)
        plus, minus = (distributed_score_tokens(model, batch, v=v, eta=s * fd_step, **kw) for s in (1, -1))
        fd = (base, plus, minus, fd_step)
    return linear_from_passes(js, fd, quadratic=quadratic, variance_reduced=variance_reduced, logq=logq,
                              groups=groups)


# ------------------------------------------------------------------------------------------------ U
def distributed_gradient(model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter], batch,
                         coef: torch.Tensor, *, microbatch_size: int | str = 4, temperature: float = 1.0,
                         shard: str = "contiguous", local: bool = False) -> tuple[dict[str, torch.Tensor], float]:
    """g = ∇ Σ_i c_i S_i over the whole batch: each rank backpropagates its own prompt groups
    (`shard_groups`, or every row it holds when `local`), float64 gradients all-reduced (SUM).

    Args: coef (N,) the Dr.GRPO coefficients of `batch`'s rows, computed on the FULL batch.
    Returns: (g name -> float64 tensor, identical on every rank; the loss Σ_i c_i S_i).
    """
    N = batch_tensors(batch)[0].shape[0]
    rows = torch.arange(N) if local else shard_groups(batch["group"], mode=shard)
    if len(rows):
        mine = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "response_mask", "group") if k in batch}
        g, _, loss = accumulate_gradient(model, params, mine, coef[rows], microbatch_size=microbatch_size,
                                         temperature=temperature)
    else:                                                            # more ranks than groups
        device = next(iter(params.values())).device
        g = {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in params.items()}
        loss = 0.0
    total = all_reduce_sum({"loss": torch.tensor(loss, dtype=torch.float64)})["loss"]
    return all_reduce_sum(g), float(total)


def distributed_update_vector(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, *,
                              microbatch_size: int | str = 4, clip_norm: float | None = None,
                              temperature: float = 1.0, dropout: bool = False, shard: str = "contiguous",
                              local: bool = False) -> UpdateResult:
    """`update.compute_update_vector` with U split across ranks by prompt group (DESIGN §1.1).

    Full mode: every rank holds all of U; c_i come from all of U's groups, rank r backpropagates its
    groups. Local mode (`local=True`): each rank holds only its own whole groups (e.g. sampled per rank
    with `rank_seed`; labels need only be distinct within a rank); c_i are computed per rank and rescaled
    by B_U(rank)/B_U(all), which is the full-batch coefficient since G_b and L_max(b) are per group.
    Returns: UpdateResult with v and stats (loss, num_sequences and tokens of the whole batch) equal
             on every rank. Raises: as compute_update_vector.
    """
    ids, am, rm = batch_tensors(batch)
    check_batch(ids, am, rm)
    named = get_optimizer_named_params(model, optimizer)
    _check_state(named, optimizer)                                  # before the expensive backward
    T = rm.sum(-1)
    coef = drgrpo_coefficients(batch["advantages"], batch["group"], T)   # (N,) DESIGN §1.1
    totals = {"sequences": torch.tensor(float(len(T))), "tokens": T.sum().double()}
    if local:
        b_here = torch.tensor(float(len(torch.unique(batch["group"]))))
        totals = all_reduce_sum({**totals, "groups": b_here})
        coef = coef * (b_here.double() / totals["groups"])           # 1/B_U of the whole batch (trap §2.6)
    was_training = model.training
    model.train(dropout)
    try:
        g, loss = distributed_gradient(model, named, batch, coef, microbatch_size=microbatch_size,
                                       temperature=temperature, shard=shard, local=local)
    finally:
        model.train(was_training)
    res = update_from_gradient(model, optimizer, g, clip_norm=clip_norm)
    res.stats.update(loss=loss, num_sequences=int(totals["sequences"]), tokens=int(totals["tokens"]))
    return res
