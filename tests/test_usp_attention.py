import pytest
import torch

from batched import Batched
from conftest import rel_error
from parity_targets import attention_inputs
from usp_video.distributed.parallel.mesh import resolve_degrees, valid_factorizations
from usp_video.distributed.parallel.usp_attention import attention, attention_with_lse, resolve_backend

HEADS = 12


def test_lse_kernels_agree_with_math_reference():
    q, k, v = attention_inputs(37, 4)
    ref_out, ref_lse = attention_with_lse(q, k, v, "math")
    out, lse = attention_with_lse(q, k, v, "sdpa")
    assert rel_error(out, ref_out) < 1e-5
    assert rel_error(lse, ref_lse) < 1e-5
    assert rel_error(attention(q, k, v, "sdpa"), ref_out) < 1e-5


CASES = [(n, u, r) for n in (2, 3, 4) for u, r in valid_factorizations(n, HEADS)]


SEQ_LENS = [24, 37]  # 37 divides none of 2, 3, 4


# The other backends that run on CPU ("auto" resolves to sdpa there): math on Ulysses, Ring and both, padded shards.
MATH_CASES = [(2, 2, 1), (2, 1, 2), (4, 2, 2)]


@pytest.fixture(scope="module")
def attention_runs(tests_dir):
    return Batched(tests_dir, "usp_attention_rank", [(n, dict(ulysses=u, ring=r, seq_len=s, heads=HEADS))
                                                      for n, u, r in CASES for s in SEQ_LENS]
                   + [(n, dict(ulysses=u, ring=r, seq_len=37, heads=HEADS, backend="math")) for n, u, r in MATH_CASES])


@pytest.mark.parametrize("world_size,ulysses,ring", MATH_CASES)
def test_math_backend_usp_attention_matches_one_process(attention_runs, world_size, ulysses, ring):
    q, k, v = attention_inputs(37, HEADS)
    expected = attention(q, k, v, "sdpa")
    for rank, result in enumerate(attention_runs(world_size, ulysses=ulysses, ring=ring, seq_len=37, heads=HEADS,
                                                 backend="math")):
        err = rel_error(result["out"], expected)
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e} (math, ulysses={ulysses} ring={ring})"


def test_auto_backend_is_sdpa_on_cpu_and_gpu_only_kernels_are_refused():
    assert resolve_backend("auto", "cpu") == "sdpa"
    for backend in ("flash_attn", "sageattention"):
        with pytest.raises(ValueError, match=f"'{backend}' needs a CUDA GPU.*use attention 'auto' or one of sdpa, math"):
            resolve_backend(backend, "cpu")
    with pytest.raises(ValueError, match="must be one of auto, sdpa, flash_attn, sageattention, math, got 'xformers'"):
        resolve_backend("xformers", "cpu")


def test_backend_choice_on_gpus(monkeypatch):
    """Where the packages are installed (pretended here: nothing runs), sageattention only with ring 1."""
    from usp_video.distributed.parallel import kernels

    monkeypatch.setattr(kernels, "installed", lambda backend: True)
    bf16 = torch.bfloat16
    assert resolve_backend("auto", "cuda", bf16, ring_degree=1) == "sageattention"
    assert resolve_backend("auto", "cuda", bf16, ring_degree=2) == "flash_attn"
    assert resolve_backend("auto", "cuda", torch.float32, ring_degree=1) == "sdpa"  # the others need bf16 / fp16
    assert resolve_backend("sageattention", "cuda", bf16, ring_degree=1) == "sageattention"
    with pytest.raises(ValueError, match="no log-sum-exp.*ring 1.*not ring 2.*one of sdpa, flash_attn, math"):
        resolve_backend("sageattention", "cuda", bf16, ring_degree=2)
    with pytest.raises(ValueError, match="bf16 or fp16 only, not float32"):
        resolve_backend("flash_attn", "cuda", torch.float32)
    monkeypatch.setattr(kernels, "installed", lambda backend: backend != "sageattention")
    assert resolve_backend("auto", "cuda", bf16, ring_degree=1) == "flash_attn"
    with pytest.raises(ValueError, match=r"needs the sageattention package \(pip install sageattention\)"):
        resolve_backend("sageattention", "cuda", bf16)


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("world_size,ulysses,ring", CASES)
def test_usp_attention_matches_one_process(attention_runs, world_size, ulysses, ring, seq_len):
    q, k, v = attention_inputs(seq_len, HEADS)
    expected = attention(q, k, v, "sdpa")
    results = attention_runs(world_size, ulysses=ulysses, ring=ring, seq_len=seq_len, heads=HEADS)
    for rank, result in enumerate(results):
        assert result["out"].shape == expected.shape
        err = rel_error(result["out"], expected)
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e} (ulysses={ulysses} ring={ring})"


JOINT = [
    (37, 7, False),   # text kept whole: 7 divides no degree
    (37, 12, True),   # text sharded with the video: 12 divides 2, 3 and 4
    (37, 12, False),  # the whole-text path also for a length that would divide
]


@pytest.fixture(scope="module")
def joint_runs(tests_dir):
    return Batched(tests_dir, "usp_joint_attention_rank", [
        (n, dict(ulysses=u, ring=r, seq_len=s, text_len=t, heads=HEADS, shard_text=sh))
        for n, u, r in [(1, 1, 1)] + CASES for s, t, sh in JOINT])


@pytest.mark.parametrize("seq_len,text_len,shard_text", JOINT)
@pytest.mark.parametrize("world_size,ulysses,ring", [(1, 1, 1)] + CASES)
def test_joint_text_attention_matches_one_process(joint_runs, world_size, ulysses, ring, seq_len, text_len,
                                                  shard_text):
    q, k, v = attention_inputs(seq_len + text_len, HEADS)
    expected = attention(q, k, v, "sdpa")
    results = joint_runs(world_size, ulysses=ulysses, ring=ring, seq_len=seq_len, text_len=text_len, heads=HEADS,
                         shard_text=shard_text)
    for rank, result in enumerate(results):
        got = torch.cat([result["video"], result["text"]], dim=1)
        err = rel_error(got, expected)
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e} (ulysses={ulysses} ring={ring})"


def test_resolve_degrees_auto_prefers_ulysses():
    assert resolve_degrees(4, 12) == (4, 1)
    assert resolve_degrees(8, 12) == (4, 2)
    assert resolve_degrees(6, 40) == (2, 3)
    assert resolve_degrees(4, 12, ulysses=2) == (2, 2)
    assert resolve_degrees(4, 12, ring=4) == (1, 4)


@pytest.mark.parametrize("ulysses,ring,needle", [
    (8, 1, "does not divide the model's 12 attention heads"),
    (2, 3, "ulysses x ring = 2 x 3 = 6, but the group has 4 ranks"),
])
def test_resolve_degrees_names_the_problem(ulysses, ring, needle):
    with pytest.raises(ValueError, match="Valid choices") as info:
        resolve_degrees(4 if ulysses != 8 else 8, HEADS, ulysses, ring)
    assert needle in str(info.value)
