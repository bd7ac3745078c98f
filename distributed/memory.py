"""The activations pre-flight: what one sampling step adds to a rank's memory at its peak.

A DiT step holds, at its peak, a block's working tensors for this rank's tokens: the residual stream,
the normed input, q/k/v and the attention output (tokens x hidden each), the FFN's intermediate and
its activation (tokens x ffn each), plus what sequence parallelism adds (the all-to-all's send and
receive buffers; the ring's K/V chunks in flight and its float32 output and log-sum-exp), and with
sharded weights the gathered weights of the block that runs and of the next (FSDP2's prefetch).

The per-token counts below were fitted on CPU ranks in float32 (benchmarks/memory_bench.py --activations
measures the peak added resident memory, VmHWM after a reset minus VmRSS before, for Wan-shaped DiTs of
three widths and FFN sizes at 2000-5400 tokens, batch 1 and 2): live tensors at the peak were about
5 x tokens x hidden and 2.1 x tokens x ffn, plus ~12 MiB (batch 1) to ~18 MiB (batch 2) of fixed costs.
The constants keep a margin above that (the prediction was 1.1-1.25x the measured peak there, with 1 rank or
a ring of 2). What Ulysses adds grew faster than the width in these runs (about 3 x tokens x hidden at
hidden 512, 6 x at 1024, whatever the heads): the constant covers the widest measured, so for narrow
models with Ulysses the prediction is up to ~1.4x the peak (results/activations.json). On a GPU,
torch.cuda.max_memory_allocated is the check (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import math

HIDDEN_PER_TOKEN = 5.5   # tokens x hidden tensors live at a block's peak
FFN_PER_TOKEN = 2.25     # tokens x ffn tensors (the FFN's intermediate and its activation)
ULYSSES_PER_TOKEN = 6.0  # extra tokens x hidden: the all-to-all's buffers of q, k, v and the output
RING_PER_TOKEN = 2.5     # extra tokens x hidden: K/V chunks sent and received
RING_FP32_PER_TOKEN = 2.0  # tokens x hidden in float32: the ring's running output and its merge
FIXED = 8 << 20          # bytes, plus FIXED per batch element: timestep tables, RoPE, small tensors


def step_activation_bytes(tokens: int, hidden: int, ffn: int, batch: int, element_size: int, sp_ranks: int = 1,
                          ulysses: int = 1, ring: int = 1) -> int:
    """Predicted peak of one step's activations on one rank: `tokens` is the sequence the blocks run on
    (video tokens, plus text tokens where they join the attention), split over the sp_ranks of a
    sequence-parallel group (the last ranks padded to the same length)."""
    per_rank = math.ceil(tokens / sp_ranks)
    per_token = HIDDEN_PER_TOKEN * hidden + FFN_PER_TOKEN * ffn
    if ulysses > 1:
        per_token += ULYSSES_PER_TOKEN * hidden
    if ring > 1:
        per_token += RING_PER_TOKEN * hidden
    extra_fp32 = RING_FP32_PER_TOKEN * hidden * 4 if ring > 1 else 0
    return int(batch * per_rank * (per_token * element_size + extra_fp32) + FIXED * (1 + batch))


def gathered_block_bytes(blocks) -> int:
    """With sharded weights: the largest block's whole weights, twice (the block that runs and the next,
    gathered ahead by FSDP2)."""
    largest = 0
    for block in blocks:
        largest = max(largest, sum(p.numel() * p.element_size() for p in block.parameters()))
    return 2 * largest



def step_flops(tokens: int, hidden: int, ffn: int, blocks: int, batch: int, sp_ranks: int) -> tuple[float, float]:
    """(attention, linear): floating-point operations one rank runs for one forward of `blocks` DiT blocks on `tokens`
    tokens split over sp_ranks ranks (the step-time pre-flight's count; a multiply-add is 2). attention: the
    self-attention's scores and weighted sum, 4 x tokens^2 x hidden for the whole sequence; linear: its projections
    q, k, v, out plus the cross-attention's q and out (6 x hidden^2 a token) and the FFN (2 x hidden x ffn a token).
    Text tokens and the embeddings are left out: small beside these."""
    scale = blocks * batch / sp_ranks
    return 4.0 * tokens * tokens * hidden * scale, 2.0 * tokens * (6 * hidden * hidden + 2 * hidden * ffn) * scale
