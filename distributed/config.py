"""The group's configuration, defined once.

GroupConfig is what the USP Group node, the CLI and the tests ask for; the launcher hands it to the
ranks as JSON (`--config-json`), and a hand-started multi-host torchrun command and `usp-video generate`
give the same fields as flags (`--ulysses 2 --ring 2 ...`, declared once in FLAGS), parsed into the same
dataclass by `from_args`. Every option is
parsed by one function of its kind (`parse_degree`, `parse_choice`, ...) and checked in one place
(`GroupConfig.__post_init__`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch

from .parallel.compile import COMPILE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("cpu", "cuda")
SHARD_WEIGHTS = ("auto", "off", "on")
PLACEMENTS = ("keep", "offload", "cpu")  # residency.py (Placement) says what each does


def parse_degree(value) -> int | str:
    """'auto' or a positive integer (also given as text): a parallel degree."""
    if value == "auto":
        return value
    try:
        degree = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"a degree must be 'auto' or an integer >= 1, got {value!r}") from None
    if degree < 1 or str(degree) != str(value).strip():
        raise ValueError(f"a degree must be 'auto' or an integer >= 1, got {value!r}")
    return degree


def parse_bool(value) -> bool:
    """True/False, or 'on'/'off' (the nodes' and the command line's words for them)."""
    if isinstance(value, bool):
        return value
    if value in ("on", "off"):
        return value == "on"
    raise ValueError(f"expected 'on' or 'off', got {value!r}")


def parse_gpu_indices(value) -> tuple[int, ...]:
    """GPU indices: a tuple/list of ints, or text like '0,1,2,3' ('' for none)."""
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    text = str(value).replace(" ", "")
    return tuple(int(v) for v in text.split(",")) if text else ()


@dataclass(frozen=True)
class GroupConfig:
    """What defines a group; a different config means a different group (relaunch)."""

    ranks: int = 1
    device: str = "cpu"  # "cpu" (gloo ranks) or "cuda" (one rank per GPU, NCCL)
    gpus: tuple[int, ...] = ()  # CUDA: the GPUs to launch on (empty: as the launcher was given them)
    ulysses: int | str = "auto"
    ring: int | str = "auto"
    dtype: str = "fp32"
    attention: str = "sdpa"
    timeout: float = 600.0  # seconds before a stuck collective fails
    threads_per_rank: int = 0  # CPU threads per rank (0: torch's default)
    cfg_parallel: int = 1  # 2: the conditional and unconditional passes on the two halves of the group
    shard_weights: str = "auto"  # FSDP weight sharding: off, on, or auto (when one device's memory is short)
    vae_split: bool = True  # the VAE decode shared out among the ranks (each family says how)
    placement: str = "offload"  # where idle text encoders and experts wait: keep, offload, cpu (residency.py)
    # the DiT's FSDP shards wait in host memory, copied to the GPU block by block (fsdp.py); the DiT is then always
    # sharded (shard_weights auto counts as on for it; off is refused), on one rank too
    dit_offload: bool = False
    compile: str = "off"  # torch.compile of each DiT block: off, on (inductor), aot_eager (parallel/compile.py)
    fp8_compute: bool = False  # fp8 layers multiply in fp8 (torch._scaled_mm) on GPUs of capability >= 8.9 (formats/fp8.py)
    # the step-time pre-flight's limit (seconds, 0: none), sent with each sample request (SampleRequest.max_step_s):
    # not part of what defines the group (a new limit reuses the running group)
    max_step_s: float = field(default=300.0, compare=False)

    def __post_init__(self):
        from .parallel.kernels import PACKAGES
        from .parallel.usp_attention import BACKENDS

        problems = []
        if self.device not in DEVICES:
            problems.append(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if not isinstance(self.ranks, int) or isinstance(self.ranks, bool) or self.ranks < 1:
            problems.append(f"ranks must be an integer >= 1, got {self.ranks!r}")
        if self.device == "cuda" and self.gpus and len(self.gpus) != self.ranks:
            problems.append(f"{len(self.gpus)} GPUs listed for {self.ranks} ranks")
        for name in ("ulysses", "ring"):
            try:
                parse_degree(getattr(self, name))
            except ValueError:
                problems.append(f"{name} must be 'auto' or an integer >= 1, got {getattr(self, name)!r}")
        if self.shard_weights not in SHARD_WEIGHTS:
            problems.append(f"shard_weights must be one of {', '.join(SHARD_WEIGHTS)}, got {self.shard_weights!r}")
        if self.placement not in PLACEMENTS:
            problems.append(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.cfg_parallel not in (1, 2):
            problems.append(f"cfg_parallel must be 1 (off) or 2, got {self.cfg_parallel!r}")
        elif isinstance(self.ranks, int) and self.ranks % self.cfg_parallel:
            problems.append(f"cfg_parallel degree must be 1 or 2 and divide the {self.ranks} ranks: cfg_parallel 2 "
                            f"splits the group into two halves, so it needs an even number of ranks, got {self.ranks}")
        sp_ranks = self.sp_ranks if self.cfg_parallel in (1, 2) and isinstance(self.ranks, int) else 0
        if isinstance(self.ulysses, int) and isinstance(self.ring, int) and self.ulysses * self.ring != sp_ranks:
            half = " per cfg half" if self.cfg_parallel == 2 else ""
            problems.append(f"ulysses x ring = {self.ulysses} x {self.ring} = {self.ulysses * self.ring}, "
                            f"but the group has {sp_ranks} ranks{half}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attention not in BACKENDS:
            problems.append(f"attention must be one of {', '.join(BACKENDS)}, got {self.attention!r}")
        elif self.attention in PACKAGES and self.device != "cuda":
            problems.append(f"attention '{self.attention}' needs CUDA GPUs; use 'auto' or 'sdpa' on CPU")
        if self.compile not in COMPILE:
            problems.append(f"compile must be one of {', '.join(COMPILE)}, got {self.compile!r}")
        if not isinstance(self.fp8_compute, bool):
            problems.append(f"fp8_compute must be True or False, got {self.fp8_compute!r}")
        elif self.fp8_compute and self.device != "cuda":
            problems.append("fp8_compute 'on' multiplies in fp8 (torch._scaled_mm) on CUDA GPUs of compute capability "
                            ">= 8.9 (Ada, Hopper, Blackwell), not on CPU: use fp8_compute 'off' here")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            problems.append(f"timeout must be > 0 seconds, got {self.timeout}")
        if not (isinstance(self.max_step_s, (int, float)) and self.max_step_s >= 0):
            problems.append(f"max_step_s must be >= 0 seconds (0: no limit), got {self.max_step_s!r}")
        if not isinstance(self.threads_per_rank, int) or self.threads_per_rank < 0:
            problems.append(f"threads_per_rank must be an integer >= 0, got {self.threads_per_rank!r}")
        if not isinstance(self.vae_split, bool):
            problems.append(f"vae_split must be True or False, got {self.vae_split!r}")
        if not isinstance(self.dit_offload, bool):
            problems.append(f"dit_offload must be True or False, got {self.dit_offload!r}")
        elif self.dit_offload and self.shard_weights == "off":
            problems.append("dit_offload keeps the DiT's FSDP weight shards in host memory, so it shards the DiT: "
                            "use shard_weights 'auto' or 'on' with dit_offload on, or turn dit_offload off")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def sp_ranks(self) -> int:
        """Ranks per sequence-parallel group (per CFG half with cfg_parallel 2)."""
        return self.ranks // self.cfg_parallel

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        where = f"GPUs {','.join(map(str, self.gpus))}" if self.device == "cuda" else f"{self.ranks} CPU ranks"
        cfg = ", cfg-parallel 2" if self.cfg_parallel == 2 else ""
        extras = "".join([f", compile {self.compile}" if self.compile != "off" else "",
                          ", fp8 compute" if self.fp8_compute else ""])
        return f"{where}, ulysses={self.ulysses}, ring={self.ring}{cfg}, {self.dtype}, attention {self.attention}{extras}"

    # -- as JSON (the launcher -> the ranks) -----------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GroupConfig":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown group config fields: {', '.join(sorted(unknown))}")
        if "gpus" in data:
            data["gpus"] = parse_gpu_indices(data["gpus"])
        return cls(**data)

    # -- as flags (a hand-started torchrun command, the `usp-video generate` command line) -------------

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None,
                      skip: tuple[str, ...] = ()) -> None:
        """The fields as flags; `from_args` turns the parsed flags into a GroupConfig. defaults: other
        defaults than the fields' ({name: value}; None: the caller decides, e.g. the CLI's dtype by device);
        skip: fields that are not flags there."""
        from .parallel.kernels import BACKENDS

        metavars = {"attention": "{" + ",".join(BACKENDS) + "}"}
        for name, flag in FLAGS.items():
            if name in skip:
                continue
            default = (defaults or {}).get(name, getattr(GroupConfig, name))
            shown = "" if default is None else f" (default: {_shown(default)})"
            parser.add_argument(f"--{name.replace('_', '-')}", *flag.aliases, dest=name, type=flag.parse,
                                default=default, metavar=flag.metavar or metavars.get(name), help=flag.help + shown,
                                **({"nargs": "?", "const": flag.const} if flag.const is not None else {}))

    @classmethod
    def from_args(cls, args: argparse.Namespace, ranks: int, **given) -> "GroupConfig":
        """The config of parsed flags (add_arguments'); `given`: fields the caller worked out itself."""
        flags = {name: getattr(args, name) for name in FLAGS if hasattr(args, name)}
        return cls(ranks=ranks, **{**flags, **given})


def _shown(default) -> str:
    """A default as the flag takes it (on/off for switches)."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ",".join(map(str, default)) or "none"
    return str(default)


@dataclass(frozen=True)
class _Flag:
    """One field as a flag: its parser (argparse's type), help, other names, the metavar that shows its
    choices, and const: the value of the flag given alone (--cfg-parallel)."""

    parse: Callable[[str], object]
    help: str
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    const: object = None


def _choice(name: str, choices) -> Callable[[str], str]:
    def parse(value: str):
        if value not in choices:
            raise argparse.ArgumentTypeError(f"--{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    return parse


def _flag_bool(value: str) -> bool:
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flag_degree(value: str):
    try:
        return parse_degree(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The fields as flags: a rank's command line (ranks come from torchrun's WORLD_SIZE) and `usp-video generate`'s.
FLAGS = {
    "device": _Flag(_choice("device", DEVICES), "cpu or cuda", metavar="{cpu,cuda}"),
    "gpus": _Flag(parse_gpu_indices, "GPU indices, e.g. 0,1,2,3 (usp-video generate: all when none are given; a "
                  "rank uses its LOCAL_RANK)"),
    "ulysses": _Flag(_flag_degree, "Ulysses degree, or auto"),
    "ring": _Flag(_flag_degree, "Ring degree, or auto"),
    "dtype": _Flag(_choice("dtype", DTYPES), "compute dtype (usp-video generate: bf16 on cuda, else fp32)",
                   metavar="{" + ",".join(DTYPES) + "}"),
    "attention": _Flag(str, "attention kernel (auto: the fastest available, sdpa on CPU; sageattention only with "
                       "ring 1)"),
    "timeout": _Flag(float, "seconds before a stuck collective fails"),
    "threads_per_rank": _Flag(int, "CPU threads per rank (0: torch's default)", ("--threads",)),
    "cfg_parallel": _Flag(int, "2 (or the flag alone): run the conditional and unconditional passes on the two "
                          "halves of the ranks", const=2),
    "shard_weights": _Flag(_choice("shard-weights", SHARD_WEIGHTS), "FSDP weight sharding of the DiT and the text "
                           "encoder (auto: when one device's memory is short)",
                           metavar="{" + ",".join(SHARD_WEIGHTS) + "}"),
    "vae_split": _Flag(_flag_bool, "split the VAE decode across the ranks (exact)", metavar="{on,off}"),
    "placement": _Flag(_choice("placement", PLACEMENTS), "where idle models wait: offload (text encoders and the idle "
                       "expert in host memory), keep (on the GPUs), cpu (text encoders run on the CPU)",
                       metavar="{" + ",".join(PLACEMENTS) + "}"),
    "dit_offload": _Flag(_flag_bool, "the DiT's weight shards wait in host memory and each block's are copied to the "
                         "GPU just before it runs (FSDP2 CPU offload; for a DiT whose per-rank share does not fit a "
                         "GPU; slower)", metavar="{on,off}"),
    "compile": _Flag(_choice("compile", COMPILE), "torch.compile each DiT block: on (inductor), aot_eager (checks "
                     "compilation, no speed gain)", metavar="{" + ",".join(COMPILE) + "}"),
    "fp8_compute": _Flag(_flag_bool, "an fp8 file's layers multiply in fp8 (torch._scaled_mm; CUDA GPUs of compute "
                         "capability >= 8.9)", metavar="{on,off}"),
}
