"""What the LTX-2 parity tests run on N gloo ranks (usp_video.distributed.testing.spawn) and on one process.

    ltx2_forward(rank, world_size, path, shape, audio_frames, ulysses, ring, **input_kwargs)
        the DiT of the file at path, loaded by the family's loader, parallelized over (ulysses, ring), on the tiny
        inputs -> "video", "audio" (both whole on every rank) and the bytes this rank sent at each collective
    run_cases(rank, world_size, cases)   many of them in one spawn, results under "<index>/"
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def byte_counter():
    """benchmarks' ByteCounter (all-to-all, ring sends, all-gather), counting the all-reduces too: a ring
    all-reduce sends 2 (n - 1) / n of its tensor."""
    import torch.distributed as dist
    from bench_targets import ByteCounter

    class Counter(ByteCounter):
        def __enter__(self):
            super().__enter__()
            self.bytes["all_reduce"] = 0
            counter = self

            def all_reduce(tensor, *args, group=None, **kwargs):
                n = dist.get_world_size(group)
                counter.bytes["all_reduce"] += 2 * (n - 1) * tensor.numel() * tensor.element_size() // n
                return counter._saved["all_reduce"](tensor, *args, group=group, **kwargs)

            self._saved["all_reduce"] = dist.all_reduce
            dist.all_reduce = all_reduce
            return self
    return Counter()


def ltx2_forward(rank, world_size, path, shape, audio_frames, ulysses=1, ring=1, shard_weights=False, **input_kwargs):
    from usp_video.distributed.models.ltx2.dit import infer_ltx2_config, load_ltx2_transformer
    from usp_video.distributed.models.ltx2.tiny import tiny_inputs
    from usp_video.distributed.models.ltx2.usp import parallelize_ltx2
    from usp_video.distributed.formats.checkpoint import read_header
    from usp_video.distributed.parallel.mesh import SequenceParallel, build_sequence_parallel

    sp = build_sequence_parallel(ulysses, ring) if world_size > 1 else SequenceParallel()
    config = infer_ltx2_config(Path(path), *read_header(path))
    shard = None
    if shard_weights:  # FSDP2 over the ranks, each block then the rest, each rank reading only its shards
        from usp_video.distributed.parallel.fsdp import shard_model

        def shard(model):
            return shard_model(model, model.transformer_blocks, torch.device("cpu"))
    model = parallelize_ltx2(load_ltx2_transformer(path, shard=shard), sp).module
    inputs = tiny_inputs(tuple(shape), audio_frames, config, **input_kwargs)
    with torch.no_grad(), byte_counter() as counter:
        video, audio = model(**inputs, return_dict=False)
    from torch.distributed.tensor import DTensor

    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    out = {"video": video, "audio": audio, "sharded_parameters": torch.tensor([sharded])}
    out.update({f"bytes/{k}": torch.tensor([v], dtype=torch.float64) for k, v in counter.bytes.items()})
    return out


def run_cases(rank, world_size, cases):
    out = {}
    for i, kwargs in enumerate(cases):
        for name, value in ltx2_forward(rank, world_size, **kwargs).items():
            out[f"{i}/{name}"] = value
    return out
