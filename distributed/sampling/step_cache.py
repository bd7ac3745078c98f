"""Step caches that compose with sequence parallelism: TeaCache and the first-block cache.

Both skip the transformer blocks at a step whose input barely changed since the last computed
step and add the residual that those blocks produced then (output - input, kept per rank: each
rank holds the residual of its own tokens).

- TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"):
  before the blocks, the relative L1 change of the first block's timestep-modulated input since the
  previous step, rescaled by a polynomial fitted per model (the published coefficients, from the
  family), is accumulated; while the sum stays below the threshold the whole stack is skipped
  (residual = last block's output - first block's input); a computed step resets the sum.
- First-block cache (ParaAttention's FBCache): the first block always runs; when its residual
  changed, relative to the residual at the last computed step, by less than the threshold, the
  other blocks are skipped (residual = last block's output - first block's output).
- MagCache (Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache"): the published
  per-step magnitude ratios of consecutive residuals (calibrated per model, from the family,
  stretched to the run's step count by nearest neighbour) are multiplied up since the last computed
  step; while the summed error |1 - product| stays below the threshold and at most K steps in a row
  were skipped, the whole stack is skipped. The first 20% of the steps always run. Its decision uses
  no activation at all, so it is the same on every rank by construction.

Under sequence parallelism every rank sees only its shard of the tokens, so a decision taken per
rank would differ between ranks and the next collective would hang or mix steps. Here the L1 sums
are taken over this rank's real tokens (padding excluded), summed over the SP group (all-reduce, in
float64), and SP rank 0's sums are broadcast: every rank then takes the same decision from the same
two numbers. The CFG halves of cfg-parallel have their own SP groups and their own caches; passes
run one after the other (conditional, unconditional) keep separate caches; a batched pass (both
halves in one batch) takes one decision for the batch. A Wan 2.2 expert switch starts the caches
afresh.

The family says where its blocks are and what TeaCache measures (ModelFamily.step_cache_spec).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

METHODS = ("off", "teacache", "fbcache", "magcache")


@dataclass(frozen=True)
class CacheSettings:
    """A sampler's cache option. threshold: TeaCache's accumulated rescaled distance / the first-block
    cache's relative change; start/end: the fraction of the run's steps in which skipping is allowed
    (steps before start and from end on are always computed)."""

    method: str = "off"
    threshold: float = 0.0
    start: float = 0.0
    end: float = 1.0

    @classmethod
    def from_dict(cls, value: dict | None) -> "CacheSettings":
        """The request's `cache` field, checked; a clear message naming the input otherwise."""
        if not value:
            return cls()
        if not isinstance(value, dict):
            raise ValueError(f"cache must be a mapping like {{'method': 'teacache', 'threshold': 0.2}}, got {value!r}")
        unknown = set(value) - {"method", "threshold", "start", "end"}
        if unknown:
            raise ValueError(f"cache has unknown settings {sorted(unknown)}; it takes method, threshold, start, end")
        method = value.get("method", "off")
        if method not in METHODS:
            raise ValueError(f"cache method must be one of {', '.join(METHODS)}, got {method!r}")
        numbers = {}
        for name, default in (("threshold", 0.0), ("start", 0.0), ("end", 1.0)):
            number = value.get(name, default)
            if isinstance(number, bool) or not isinstance(number, (int, float)) or number != number:
                raise ValueError(f"cache {name} must be a number, got {number!r}")
            numbers[name] = float(number)
        if not 0.0 <= numbers["threshold"] <= 10.0:
            raise ValueError(f"cache threshold must be between 0 and 10, got {numbers['threshold']}")
        if not 0.0 <= numbers["start"] <= numbers["end"] <= 1.0:
            raise ValueError(f"cache start and end must be fractions of the steps with 0 <= start <= end <= 1, "
                             f"got start {numbers['start']}, end {numbers['end']}")
        return cls(method, **numbers)

    @property
    def on(self) -> bool:
        return self.method != "off"


@dataclass(frozen=True)
class StepCacheSpec:
    """What a family tells the caches about its DiT.

    block_lists: the ModuleLists its forward iterates, in order (their blocks take the image tokens as
    their first argument and return them, alone or first of a tuple).
    block_output(args, hidden): what a block called with args returns when its image tokens are `hidden`.
    teacache_input(args) -> (tensor, token_dim or None): TeaCache's measure, from the first block's
    arguments (token_dim: the dim of the tokens when it is per token, so sharded; None when it is not).
    teacache_coefficients: the published polynomial (highest degree first), or None (TeaCache refused).
    teacache_warmup: the first steps TeaCache always computes; teacache_last: whether it computes the last.
    """

    block_lists: list[nn.ModuleList]
    block_output: Callable[[tuple, torch.Tensor], object]
    teacache_input: Callable[[tuple], tuple[torch.Tensor, int | None]]
    teacache_coefficients: list[float] | None
    teacache_warmup: int = 1
    teacache_last: bool = True
    teacache_note: str = ""
    # MagCache: magcache_ratios(pass, steps) -> one ratio per step of that pass (None: refused, with the note)
    magcache_ratios: Callable[[str, int], list[float] | None] = lambda key, steps: None
    magcache_k: int = 2  # the most steps skipped in a row
    magcache_note: str = ""


MAGCACHE_RETENTION = 0.2  # MagCache's retention ratio: the first 20% of the steps always run


def nearest_interp(values: list[float], length: int) -> list[float]:
    """MagCache's stretching of a calibrated curve to another step count: nearest neighbour, ends kept."""
    if length == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (length - 1)
    return [values[int(round(i * scale))] for i in range(length)]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else (0.0 if numerator == 0 else float("inf"))


def polynomial(coefficients: list[float], x: float) -> float:
    """numpy.poly1d(coefficients)(x): highest degree first (TeaCache's rescaling)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


@dataclass
class _PassState:
    """The cache of one pass (an expert's conditional, unconditional or batched pass)."""

    residual: torch.Tensor | None = None  # this rank's tokens: output - reference, at the last computed step
    previous: torch.Tensor | None = None  # TeaCache: the last modulated input; FBCache: the first block's residual
    accumulated: float = 0.0  # TeaCache: the rescaled distance; MagCache: the error
    ratio: float = 1.0  # MagCache: the product of the magnitude ratios since the last computed step
    in_a_row: int = 0  # MagCache: steps skipped since the last computed one


class _CachedBlocks(nn.ModuleList):
    """A ModuleList whose iteration the running cache decides (the class of a family's block lists while
    a cached sample runs; restored after). _Forward sets, and only this module reads, two attributes on the
    list for that time: `_usp_class` (the class to restore) and `_usp_run` (the running _Forward)."""

    def __iter__(self):
        run = getattr(self, "_usp_run", None)
        blocks = list(super().__iter__())
        if run is None:
            return iter(blocks)
        return run.iterate(self, blocks)


class StepCache:
    """The caches of one sample() call. Use `with cache.forward(model, key, step, sp): model(...)`.

    Steps are counted in the whole schedule (`steps` of them), of which this call runs the ones from
    `offset` on (a KSamplerAdvanced range, or the tail that denoise < 1 keeps): warm-up steps, MagCache's
    curve and start/end refer to the whole schedule, as they would in one unsplit run."""

    def __init__(self, settings: CacheSettings, steps: int, spec_of: Callable[[nn.Module], StepCacheSpec],
                 offset: int = 0):
        self.settings, self.steps, self.spec_of, self.offset = settings, steps, spec_of, offset
        self.states: dict[str, _PassState] = {}  # per pass; cleared at an expert switch
        self.expert: int | None = None
        self.skipped_steps: set[int] = set()  # steps at which some pass skipped its blocks
        self.skipped_per_pass: dict[str, list[int]] = {}
        # every measure taken: (step, pass, this rank's own value, the group's value it decided on)
        self.trace: list[tuple[int, str, float, float]] = []

    def allowed(self, step: int) -> bool:
        s = self.settings
        return s.start * self.steps <= step < s.end * self.steps

    def start_expert(self, expert: int) -> None:
        """A step on `expert`; a switch from another expert starts the caches afresh."""
        if self.expert is not None and expert != self.expert:
            self.states.clear()
        self.expert = expert

    def forward(self, hooks, key: str, step: int, sp) -> "_Forward":
        """hooks: the DiT's SequenceHooks (models/family.py: its module, and what its sequence-parallel hooks
        share); step: of this call's run (0 = its first)."""
        return _Forward(self, hooks, key, self.states.setdefault(key, _PassState()), self.offset + step, sp)

    def report(self) -> dict:
        passes: dict[str, list[int]] = {}
        for key, steps in self.skipped_per_pass.items():
            passes.setdefault(key, []).extend(steps)
        return {"method": self.settings.method, "skipped_steps": sorted(self.skipped_steps),
                "skipped_per_pass": {key: sorted(steps) for key, steps in passes.items()}}


class _Forward:
    """One cached forward of a DiT: swaps its block lists' iteration for the cache's."""

    def __init__(self, cache: StepCache, hooks, key: str, state: _PassState, step: int, sp):
        self.cache, self.hooks, self.key, self.state, self.step, self.sp = cache, hooks, key, state, step, sp
        self.model = hooks.module
        self.spec = cache.spec_of(self.model)
        self.lists = self.spec.block_lists
        self.skip = False
        self.reference: torch.Tensor | None = None
        # FSDP gathers the weights of a block over the whole group, both CFG halves included: with sharded
        # weights the halves must skip the same blocks, so a step is skipped only when both would skip it
        first_block = self.lists[0][0]
        self.halves = sp.cfg_group if (sp is not None and getattr(sp, "cfg_degree", 1) == 2
                                       and hasattr(first_block, "unshard")) else None

    def __enter__(self):
        for blocks in self.lists:
            blocks._usp_class = blocks.__class__
            blocks.__class__ = _CachedBlocks
            blocks._usp_run = self
        return self

    def __exit__(self, *exc):
        for blocks in self.lists:
            blocks.__class__ = blocks.__dict__.pop("_usp_class")
            blocks.__dict__.pop("_usp_run", None)
        return False

    # -- the iteration of the block lists -----------------------------------------------------------

    def iterate(self, blocks_list: nn.ModuleList, blocks: list[nn.Module]):
        which = next(i for i, b in enumerate(self.lists) if b is blocks_list)
        last_list = which == len(self.lists) - 1
        first = 0
        if which == 0:
            first = 1
            yield lambda *args, **kwargs: self._first(blocks[0], last_list and len(blocks) == 1, args, kwargs)
        if self.skip:
            return
        for k in range(first, len(blocks)):
            if last_list and k == len(blocks) - 1:
                yield lambda *args, _block=blocks[k], **kwargs: self._last(_block, args, kwargs)
            else:
                yield blocks[k]

    def _first(self, block, also_last: bool, args: tuple, kwargs: dict):
        settings, state, spec = self.cache.settings, self.state, self.spec
        args = self.hooks.enter_blocks(args)  # the image tokens as the blocks see them: this rank's shard
        hidden = args[0]
        if settings.method == "teacache":
            measure, token_dim = spec.teacache_input(args)
            measure = measure.detach().float()
            computes = (self.step < spec.teacache_warmup or (spec.teacache_last and self.step == self.cache.steps - 1)
                        or not self.cache.allowed(self.step) or state.previous is None or state.residual is None)
            if not computes:
                distance = self._relative_l1(measure, state.previous, token_dim)
                state.accumulated += polynomial(spec.teacache_coefficients, distance)
                computes = state.accumulated >= settings.threshold
            state.previous = measure
            if not self._both_halves_skip(not computes):
                computes = True
            if not computes:
                return self._skipped(spec.block_output(args, hidden + state.residual))
            state.accumulated = 0.0
            self.reference = hidden
            out = block(*args, **kwargs)
        elif settings.method == "magcache":
            ratios = spec.magcache_ratios(self.key, self.cache.steps)
            computes = True
            if (self.step >= int(MAGCACHE_RETENTION * self.cache.steps) and self.cache.allowed(self.step)
                    and state.residual is not None):
                state.ratio *= ratios[self.step]
                state.in_a_row += 1
                state.accumulated += abs(1.0 - state.ratio)
                computes = not (state.accumulated < settings.threshold and state.in_a_row <= spec.magcache_k)
            if not self._both_halves_skip(not computes):
                computes = True
            if not computes:
                return self._skipped(spec.block_output(args, hidden + state.residual))
            state.accumulated, state.ratio, state.in_a_row = 0.0, 1.0, 0
            self.reference = hidden
            out = block(*args, **kwargs)
        else:  # fbcache
            out = block(*args, **kwargs)
            first_out = out[0] if isinstance(out, tuple) else out
            change = first_out.detach() - hidden.detach()
            skips = (self.cache.allowed(self.step) and state.previous is not None and state.residual is not None
                     and self._relative_l1(change, state.previous, 1) < settings.threshold)
            if self._both_halves_skip(skips):
                return self._skipped(spec.block_output(args, first_out + state.residual))
            state.previous = change
            self.reference = first_out
        if also_last:
            self._keep_residual(out)
        return out

    def _both_halves_skip(self, skips: bool) -> bool:
        """This pass's decision, or, with sharded weights under cfg-parallel, whether both halves skip."""
        if self.halves is None:
            return skips
        flag = torch.tensor([0 if skips else 1], dtype=torch.int32, device=self.model_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.halves)
        return int(flag) == 0

    def _skipped(self, out):
        self.skip = True
        self.cache.skipped_per_pass.setdefault(self.key, []).append(self.step)
        self.cache.skipped_steps.add(self.step)
        return out

    def _last(self, block, args: tuple, kwargs: dict):
        out = block(*args, **kwargs)
        self._keep_residual(out)
        return out

    def _keep_residual(self, out) -> None:
        final = out[0] if isinstance(out, tuple) else out
        self.state.residual = (final - self.reference).detach()

    # -- the measure, over the whole sequence -------------------------------------------------------

    def _relative_l1(self, current: torch.Tensor, previous: torch.Tensor, token_dim: int | None) -> float:
        """sum|current - previous| / sum|previous| over the real tokens of every rank of the SP group (the
        mean-over-mean of TeaCache and FBCache), the same number on every rank (SP rank 0's, broadcast)."""
        diff, base = (current - previous).abs(), previous.abs()
        sp = self.sp
        if token_dim is not None and sp is not None:
            valid = self._real_tokens(current.shape[token_dim])
            if valid is not None:
                diff, base = diff.index_select(token_dim, valid), base.index_select(token_dim, valid)
        sums = torch.stack([diff.sum(dtype=torch.float64), base.sum(dtype=torch.float64)])
        own = _ratio(float(sums[0]), float(sums[1]))
        if token_dim is not None and sp is not None and sp.degree > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=sp.group)
            dist.broadcast(sums, src=dist.get_global_rank(sp.group, 0), group=sp.group)
        elif token_dim is None and sp is not None and sp.degree > 1:
            # the same tensor on every rank (not per token): rank 0's numbers, so rounding cannot differ
            dist.broadcast(sums, src=dist.get_global_rank(sp.group, 0), group=sp.group)
        value = _ratio(float(sums[0]), float(sums[1]))
        self.cache.trace.append((self.step, self.key, own, value))
        return value

    def _real_tokens(self, local_len: int) -> torch.Tensor | None:
        """The indices of this rank's real (not padding) tokens in its shard, from the layout the
        family's sequence-parallel hooks recorded for this forward."""
        layout = getattr(self.hooks.state, "layout", None)
        if layout is None:
            return None
        valid = layout.valid[self.sp.rank][:local_len]
        return valid.nonzero().squeeze(1).to(self.model_device())

    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device


def make_step_cache(settings: CacheSettings, family, experts: list, steps: int, latent_shape: tuple[int, ...],
                    offset: int = 0) -> StepCache | None:
    """The step cache of a sample call over these experts (LoadedDiT records; None when off); a method the
    model cannot use is refused before the first step."""
    if not settings.on:
        return None
    specs = {id(dit.module): family.step_cache_spec(dit.module, latent_shape) for dit in experts}
    for spec in specs.values():
        if settings.method == "teacache" and spec.teacache_coefficients is None:
            raise ValueError(f"cache method teacache: {spec.teacache_note}")
        if settings.method == "magcache" and spec.magcache_ratios("positive", steps) is None:
            raise ValueError(f"cache method magcache: {spec.magcache_note}")
    return StepCache(settings, steps, lambda model: specs[id(model)], offset)
