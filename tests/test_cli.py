"""The CLI drives the same client as the nodes: parity between 1 and 4 ranks, clear errors."""

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import rel_error


def usp_video(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "usp_video.distributed.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def generate_args(tiny_models, *extra):
    return ["generate", "--dit", tiny_models["dit"], "--text-encoder", tiny_models["text_encoder"],
            "--vae", tiny_models["vae"], "--prompt", "a dog runs across a green field", "--width", "80",
            "--height", "48", "--frames", "9", "--steps", "4", "--seed", "11", "--threads-per-rank", "1", *extra]


def test_generate_1_rank_and_4_ranks_agree(tiny_models, tmp_path):
    one = usp_video(*generate_args(tiny_models, "--ranks", "1", "--save-latent", str(tmp_path / "one.safetensors"),
                                   "--out", str(tmp_path / "one.webp")))
    assert one.returncode == 0, one.stderr
    four = usp_video(*generate_args(tiny_models, "--ranks", "4", "--ulysses", "2", "--ring", "2",
                                    "--save-latent", str(tmp_path / "four.safetensors")))
    assert four.returncode == 0, four.stderr
    assert "ulysses=2 x ring=2" in four.stdout
    a = load_file(str(tmp_path / "one.safetensors"))["latent_tensor"]
    b = load_file(str(tmp_path / "four.safetensors"))["latent_tensor"]
    assert a.shape == (1, 16, 3, 6, 10)  # 3 x 3 x 5 = 45 tokens: not divisible by 4
    assert rel_error(b, a) <= 1e-5
    # a sampled latent, which a broken run would not match: finite, and varying within every channel (an all-zero
    # latent, or the latent format's means alone, would agree between 1 and 4 ranks too)
    assert bool(a.isfinite().all()) and float(a.std(dim=(2, 3, 4)).min()) > 0.05, a.std(dim=(2, 3, 4))
    assert (tmp_path / "one.webp").stat().st_size > 0


@pytest.mark.parametrize("extra,message", [
    (["--width", "72"], "--width 72 must be a positive multiple of 16"),
    (["--frames", "8"], "--frames 8 must be 4k+1"),
    (["--ranks", "4", "--ulysses", "3", "--ring", "1"], "ulysses x ring = 3 x 1 = 3, but the group has 4 ranks"),
    (["--ranks", "4", "--ulysses", "8", "--ring", "1"], "ulysses x ring = 8 x 1 = 8"),
    (["--steps", "0"], "steps must be an integer in 1..10000"),
    (["--cache", "tea:0.1"], "cache method must be one of off, teacache, fbcache, magcache, got 'tea'"),
    (["--cache", "fbcache:lots"], "--cache must be METHOD:THRESHOLD like fbcache:0.1, got 'fbcache:lots'"),
])
def test_generate_rejects_bad_input_clearly(tiny_models, extra, message):
    result = usp_video(*generate_args(tiny_models, *extra), timeout=120)
    assert result.returncode == 2
    assert message in result.stderr


def test_generate_with_a_step_cache_reports_the_skipped_steps(tiny_models):
    result = usp_video(*generate_args(tiny_models, "--ranks", "2", "--cache", "fbcache:0.5", "--steps", "6"))
    assert result.returncode == 0, result.stderr
    assert "skipped by the step cache" in result.stdout
    assert "step cache (fbcache) skipped steps [" in result.stdout and "skipped steps []" not in result.stdout


def test_wrong_model_file_is_named(tiny_models):
    args = generate_args(tiny_models)
    args[args.index("--dit") + 1] = tiny_models["text_encoder"]
    result = usp_video(*args, timeout=120)
    assert result.returncode == 2
    assert ("tiny_umt5.safetensors is none of Wan 2.1, Wan 2.1 VACE, Wan 2.2 Animate, Wan 2.2 TI2V-5B, HunyuanVideo 1.5 or HunyuanVideo diffusion models "
            "(looks like a T5/UMT5 text encoder)") in result.stderr


def hunyuan_args(tiny_hunyuan, *extra):
    return ["generate", "--dit", tiny_hunyuan["dit"], "--llama", tiny_hunyuan["llama"], "--clip", tiny_hunyuan["clip"],
            "--tokenizers", tiny_hunyuan["tokenizers"], "--vae", tiny_hunyuan["vae"],
            "--prompt", "a dog runs across a green field", "--width", "80", "--height", "48", "--frames", "9",
            "--steps", "4", "--seed", "11", "--threads-per-rank", "1", *extra]


def test_hunyuan_generate_1_rank_and_3_ranks_agree(tiny_hunyuan, tmp_path):
    one = usp_video(*hunyuan_args(tiny_hunyuan, "--ranks", "1", "--save-latent", str(tmp_path / "one.safetensors"),
                                  "--out", str(tmp_path / "one.webp")))
    assert one.returncode == 0, one.stderr
    assert "model: HunyuanVideo" in one.stdout
    three = usp_video(*hunyuan_args(tiny_hunyuan, "--ranks", "3", "--save-latent", str(tmp_path / "three.safetensors")))
    assert three.returncode == 0, three.stderr
    assert "ulysses=3 x ring=1" in three.stdout
    a = load_file(str(tmp_path / "one.safetensors"))["latent_tensor"]
    b = load_file(str(tmp_path / "three.safetensors"))["latent_tensor"]
    assert a.shape == (1, 16, 3, 6, 10)  # 3 x 3 x 5 = 45 video tokens
    assert a.abs().max() > 0
    assert rel_error(b, a) <= 1e-5
    # a sampled latent, which a broken run would not match: finite, and varying within every channel (an all-zero
    # latent, or the latent format's means alone, would agree between 1 and 4 ranks too)
    assert bool(a.isfinite().all()) and float(a.std(dim=(2, 3, 4)).min()) > 0.05, a.std(dim=(2, 3, 4))
    assert (tmp_path / "one.webp").stat().st_size > 0


def test_hunyuan_without_its_text_encoders_is_named(tiny_hunyuan):
    args = hunyuan_args(tiny_hunyuan)
    del args[args.index("--clip"):args.index("--clip") + 2]
    result = usp_video(*args, timeout=120)
    assert result.returncode == 2
    assert "is a HunyuanVideo model: give its text encoders with --clip" in result.stderr
