"""LTX-2 (audio + video DiT): the all-in-one file layout, one process == diffusers' stock class, and N ranks ==
one process for both outputs on every factorization of 2-4 ranks, with the bytes each rank sends per block at
the collectives equal to the analytic volume (no full-video gather).

The DiT is diffusers' LTX2VideoTransformer3DModel; the tiny files are written in Lightricks' layout (original
names under model.diffusion_model.) and read by the family's loader. Three tiny models: LTX-2 with rope "split"
(as released) and "interleaved" (diffusers' default), and an LTX-2.3-like one (gated attention, cross-attention
modulation, prompt AdaLN, text projected before the DiT, cross-modal timesteps). The multi-rank cases of one world
size run in one spawn (the first test that asks for them).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_error
from ltx2_targets import ltx2_forward
from usp_video.distributed.formats.checkpoint import CheckpointError, load_state_dict, read_header
from usp_video.distributed.models.ltx2 import dit as ltx2
from usp_video.distributed.models.ltx2 import tiny
from usp_video.distributed.parallel.mesh import valid_factorizations
from usp_video.distributed.testing.spawn import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

HEADS = tiny.tiny_config()["num_attention_heads"]  # 12: Ulysses 1-4 all divide it
FACTORIZATIONS = [(n, u, r) for n in (2, 3, 4) for u, r in valid_factorizations(n, HEADS)]
LTX23 = dict(gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True,
             use_prompt_embeddings=False, use_prompt_adaln_single=True, perturbed_attn=True)
MODELS = {"split": tiny.tiny_config("split"), "interleaved": tiny.tiny_config("interleaved"),
          "ltx23": tiny.tiny_config("split", **LTX23)}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ltx2")
    return {name: str(tiny.write_checkpoint(root / f"{name}.safetensors", config)) for name, config in MODELS.items()}


def cases():
    """(name, (n, u, r), spec): uneven video (35 tokens) and audio (13) counts on every factorization for each
    model, a per-token timestep (image-to-video's), a video too short for 4 ranks (one holds no token),
    spatio-temporal guidance (batch 2, one entry perturbed; all perturbed), and FSDP-sharded weights."""
    for n, u, r in FACTORIZATIONS:
        yield "split-video35-audio13", (n, u, r), dict(model="split", shape=(5, 1, 7), audio_frames=13)
        yield "interleaved-video35-audio13-token_timesteps", (n, u, r), dict(
            model="interleaved", shape=(5, 1, 7), audio_frames=13, per_token_timestep=True)
        yield "ltx23-video24-audio11", (n, u, r), dict(model="ltx23", shape=(3, 2, 4), audio_frames=11,
                                                         use_cross_timestep=True)
    for n, u, r in ((4, 2, 2), (4, 1, 4), (3, 3, 1)):
        yield "split-video5-audio9", (n, u, r), dict(model="split", shape=(5, 1, 1), audio_frames=9)
    for n, u, r in ((2, 2, 1), (3, 1, 3)):  # spatio-temporal guidance: one entry perturbed, then all of them
        yield "ltx23-stg-batch2", (n, u, r), dict(model="ltx23", shape=(5, 1, 7), audio_frames=13, batch=2,
                                                  stg_mask=[0.0, 1.0])
        yield "ltx23-stg-all", (n, u, r), dict(model="ltx23", shape=(5, 1, 7), audio_frames=13, stg_mask=[0.0])
    for n, u, r in ((2, 1, 2), (3, 3, 1)):  # the weights FSDP-sharded too, each rank reading its shards
        yield "ltx23-sharded_weights", (n, u, r), dict(model="ltx23", shape=(5, 1, 7), audio_frames=13,
                                                        shard_weights=True)


CASES = list(cases())


def case_id(case) -> str:
    name, (n, u, r), _ = case
    return f"{name}-{n}x{u}x{r}"


def spec_kwargs(spec: dict, files: dict) -> dict:
    return dict({k: v for k, v in spec.items() if k != "model"}, path=files[spec["model"]], shape=list(spec["shape"]))


@pytest.fixture(scope="module")
def runs(files):
    """world size -> each case's per-rank results, one spawn per world size, made when first asked for."""
    made = {}

    def results(case) -> list[dict]:
        n = case[1][0]
        if n not in made:
            batch = [c for c in CASES if c[1][0] == n]
            ranks = run_ranks(f"{Path(__file__).parent / 'ltx2_targets.py'}:run_cases", n, dict(cases=[
                dict(spec_kwargs(spec, files), ulysses=u, ring=r) for _, (_, u, r), spec in batch]),
                timeout=60 + 20 * len(batch))
            made[n] = {case_id(c): [{k.split("/", 1)[1]: v for k, v in rank.items() if k.startswith(f"{i}/")}
                                    for rank in ranks] for i, c in enumerate(batch)}
        return made[n][case_id(case)]
    return results


def analytic_bytes(n: int, u: int, r: int, config: dict, spec: dict) -> dict:
    """What each rank sends in one forward: the video self-attention's USP (cpu_bench's volumes; none in a block
    whose every batch entry spatio-temporal guidance perturbs), the output gather, and per block the video-to-audio
    merge: ring all-reduces of the log-sum-exps' maximum (B x La x Ha floats) and of the rescaled partials with
    their weights (B x La x Ha x (Da + 1)). Nothing of the size of the video's K/V."""
    from cpu_bench import analytic_bytes as usp_bytes

    frames, rows, cols = spec["shape"]
    video = frames * rows * cols
    batch = spec.get("batch", 1)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    attention_layers = layers - (spec.get("stg_mask") is not None and not any(spec["stg_mask"]))
    out = usp_bytes(n, u, r, video, hidden, attention_layers, config["out_channels"], batch=batch)
    out["all_gather"] = usp_bytes(n, u, r, video, hidden, layers, config["out_channels"], batch=batch)["all_gather"]
    heads = batch * spec["audio_frames"] * config["audio_num_attention_heads"] * 4
    out["all_reduce"] = layers * sum(2 * (n - 1) * size // n for size in (heads, heads * (config["audio_attention_head_dim"] + 1)))
    return out


def test_file_layout_is_lightricks(files):
    """The tiny file's names are those diffusers' own converter (convert_ltx2_transformer_to_diffusers, written for
    Lightricks' LTX-2 files) maps onto the stock class, tensor for tensor; and our conversion agrees with it."""
    from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers

    state = load_state_dict(files["split"])
    assert all(k.startswith("model.diffusion_model.") for k in state)
    assert "model.diffusion_model.patchify_proj.weight" in state
    assert "model.diffusion_model.transformer_blocks.0.scale_shift_table_a2v_ca_video" in state
    theirs = convert_ltx2_transformer_to_diffusers(dict(state))
    expected = tiny.tiny_state(MODELS["split"])
    assert set(theirs) == set(expected)
    assert all(torch.equal(theirs[k], expected[k]) for k in expected)
    ours = ltx2.convert_to_diffusers({k.removeprefix("model.diffusion_model."): v for k, v in state.items()})
    assert set(ours) == set(expected)


def test_config_from_shapes_alone(tmp_path):
    """Without our metadata, the config comes from the shapes (released head widths) and the flags of LTX-2.3
    (gates, 9 modulation rows, prompt AdaLN, no caption projection in the DiT); the rope kind from Lightricks'
    own config metadata, "split" when it says nothing. The file's VAE, vocoder and connector tensors are ignored."""
    from usp_video.distributed.formats.checkpoint import save_safetensors

    config = dict(MODELS["ltx23"], num_attention_heads=2, attention_head_dim=128, cross_attention_dim=256,
                  audio_num_attention_heads=2, audio_attention_head_dim=64, audio_cross_attention_dim=128,
                  num_layers=1, rope_type="interleaved", caption_channels=3840, ff_bias=True, audio_ff_bias=True)
    state = {f"model.diffusion_model.{k}": v for k, v in ltx2.ltx2_to_original_keys(tiny.tiny_state(config)).items()}
    state["vae.per_channel_statistics.mean-of-means"] = torch.zeros(128)
    state["model.diffusion_model.video_embeddings_connector.learnable_registers"] = torch.zeros(4, 256)
    for rope, meta in (("split", {}), ("interleaved", {"config": json.dumps({"transformer": {"rope_type": "interleaved"}})})):
        path = tmp_path / f"{rope}.safetensors"
        save_safetensors(state, path, meta)
        assert ltx2.infer_ltx2_config(path, *read_header(path)) == dict(config, rope_type=rope)
    model = ltx2.load_ltx2_transformer(path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny.tiny_state(config).items())


def test_refuses_other_files(tmp_path, files):
    from usp_video.distributed.formats.checkpoint import save_safetensors

    path = tmp_path / "ltxv.safetensors"
    save_safetensors({"model.diffusion_model.adaln_single.emb.timestep_embedder.linear_1.bias": torch.zeros(4)},
                     path, {})
    with pytest.raises(CheckpointError, match="not an LTX-2 audio-video model"):
        ltx2.load_ltx2_transformer(path)


@pytest.mark.parametrize("model", list(MODELS))
def test_one_process_equals_stock(files, model):
    """The family's loader and hooks on one process == diffusers' stock class with the same weights, both outputs
    (a per-token timestep in the interleaved case; cross-modal timesteps and spatio-temporal guidance on one of
    two batch entries in the LTX-2.3-like one)."""
    from diffusers import LTX2VideoTransformer3DModel

    config = MODELS[model]
    stock = LTX2VideoTransformer3DModel(**config).eval()
    stock.load_state_dict(tiny.tiny_state(config))
    kwargs = dict(per_token_timestep=model == "interleaved")
    if model == "ltx23":
        kwargs.update(use_cross_timestep=True, batch=2, stg_mask=[0.0, 1.0])
    with torch.no_grad():
        video, audio = stock(**tiny.tiny_inputs((5, 1, 7), 13, config, **kwargs), return_dict=False)
    ours = ltx2_forward(0, 1, files[model], (5, 1, 7), 13, **kwargs)
    assert video.abs().max() > 0 and audio.abs().max() > 0
    assert rel_error(ours["video"], video) <= 1e-6 and rel_error(ours["audio"], audio) <= 1e-6


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(c), marks=[pytest.mark.slow] * (c[1][0] == 4))
                                  for c in CASES])
def test_n_ranks_equal_one_process(files, runs, case):
    _, (n, u, r), spec = case
    expected = ltx2_forward(0, 1, **dict(spec_kwargs(spec, files), shard_weights=False))
    volumes = analytic_bytes(n, u, r, MODELS[spec["model"]], spec)
    for rank, result in enumerate(runs(case)):
        for key in ("video", "audio"):
            err = rel_error(result[key], expected[key])
            assert err <= 1e-5, f"rank {rank} {key}: relative error {err:.2e} ({case_id(case)})"
        parameters = int(result["sharded_parameters"])
        assert (parameters > 0) == spec.get("shard_weights", False), f"rank {rank}: {parameters} sharded parameters"
        sent = {k: int(result[f"bytes/{k}"]) for k in volumes}
        for kind, volume in volumes.items():
            assert abs(sent[kind] - volume) <= 0.02 * volume, f"rank {rank} {kind}: sent {sent[kind]}, analytic {volume}"


def test_diffusers_folder(tmp_path):
    """A diffusers 'transformer' folder loads through from_pretrained (safetensors only)."""
    from diffusers import LTX2VideoTransformer3DModel

    config = MODELS["split"]
    stock = LTX2VideoTransformer3DModel(**config)
    stock.load_state_dict(tiny.tiny_state(config))
    stock.save_pretrained(tmp_path / "transformer")
    model = ltx2.load_ltx2_transformer(tmp_path / "transformer")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stock.state_dict().items())


def test_vaes_from_the_all_in_one_file(tmp_path):
    """The video and audio VAEs of an all-in-one file (beside the DiT): diffusers' own converters map the tiny
    file's names onto the stock classes tensor for tensor; our loaders give the stock weights, and decode (and
    encode) as the stock classes do; the DiT loads from the same file, leaving the VAEs unread."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
    from diffusers.loaders.single_file_utils import (convert_ltx2_audio_vae_to_diffusers,
                                                     convert_ltx2_vae_to_diffusers)
    from usp_video.distributed.models.ltx2 import vae

    path = tiny.write_checkpoint(tmp_path / "all_in_one.safetensors", MODELS["split"], vaes=True)
    state = load_state_dict(path)
    video, audio = tiny.vae_states()
    for prefix, convert, expected in (("vae.", convert_ltx2_vae_to_diffusers, video),
                                      ("audio_vae.", convert_ltx2_audio_vae_to_diffusers, audio)):
        theirs = convert({k: v for k, v in state.items() if k.startswith(prefix)})
        assert set(theirs) == set(expected) and all(torch.equal(theirs[k], expected[k]) for k in expected)
    g = torch.Generator().manual_seed(3)
    for load, cls, config, expected, sample in (
            (vae.load_video_vae, AutoencoderKLLTX2Video, vae.TINY_VIDEO_VAE, video, torch.rand(1, 3, 9, 64, 64, generator=g)),
            (vae.load_audio_vae, AutoencoderKLLTX2Audio, vae.TINY_AUDIO_VAE, audio, torch.randn(1, 2, 17, 16, generator=g))):
        ours = load(path)
        stock = cls(**config).eval()
        stock.load_state_dict(expected)
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in expected.items())
        with torch.no_grad():
            latent = stock.encode(sample).latent_dist.mode()
            assert rel_error(ours.encode(sample).latent_dist.mode(), latent) <= 1e-6
            assert rel_error(ours.decode(latent).sample, stock.decode(latent).sample) <= 1e-6
    dit = ltx2.load_ltx2_transformer(path)
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in tiny.tiny_state(MODELS["split"]).items())
    with pytest.raises(CheckpointError, match="holds no audio_vae"):
        vae.load_audio_vae(tiny.write_checkpoint(tmp_path / "dit_only.safetensors", MODELS["split"]))


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_file(files, tmp_path, scaled):
    """An fp8 file (ltx-2-19b-dev-fp8's layout; ComfyUI's scaled fp8 too): the blocks' Linear weights stay fp8 in
    memory and the forward equals the same weights dequantized at load."""
    from usp_video.distributed.formats.checkpoint import save_safetensors

    _, metadata = read_header(files["split"])
    state = {}
    for key, value in load_state_dict(files["split"]).items():
        if value.dim() == 2 and key.endswith(".weight"):  # the Linear weights (not the modulation tables)
            scale = value.abs().max() / 448.0 if scaled else torch.tensor(1.0)
            state[key] = (value / scale).to(torch.float8_e4m3fn)
            if scaled:
                state[key.removesuffix("weight") + "scale_weight"] = scale.reshape(1).float()
        else:
            state[key] = value
    if scaled:
        state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "fp8.safetensors"
    save_safetensors(state, path, metadata)
    kept, plain = ltx2.load_ltx2_transformer(path), ltx2.load_ltx2_transformer(path, keep_fp8=False)
    assert kept.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert plain.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float32
    inputs = tiny.tiny_inputs((5, 1, 7), 13, MODELS["split"])
    with torch.no_grad():
        for a, b in zip(kept(**inputs, return_dict=False), plain(**inputs, return_dict=False)):
            assert rel_error(a, b) <= 1e-5


def test_vocoder_from_the_all_in_one_file(tmp_path):
    """The vocoder (ComfyUI's / Lightricks' names, read into diffusers' LTX2Vocoder): the stock weights and the
    stock waveform; its config from the file's own config metadata (Lightricks' names) where ours is absent; a
    vocoder with bandwidth extension (LTX-2.3) refused by name."""
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from usp_video.distributed.formats.checkpoint import save_safetensors
    from usp_video.distributed.models.ltx2 import vocoder

    path = tiny.write_checkpoint(tmp_path / "all_in_one.safetensors", MODELS["split"], vaes=True)
    state = load_state_dict(path)
    assert "vocoder.conv_pre.weight" in state and "vocoder.resblocks.0.convs1.0.weight" in state
    stock = LTX2Vocoder(**vocoder.TINY_VOCODER).eval()
    stock.load_state_dict(tiny.vocoder_state())
    mel = torch.randn(1, 2, 11, 16, generator=torch.Generator().manual_seed(4))  # (B, channels, frames, mel bins)
    with torch.no_grad():
        expected = stock(mel)
        assert rel_error(vocoder.load_vocoder(path)(mel), expected) <= 1e-6
    theirs = {"upsample_initial_channel": 16, "upsample_rates": [2, 2], "upsample_kernel_sizes": [4, 4],
              "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3], [1, 3]], "resblock": "1",
              "stereo": True}
    lightricks = tmp_path / "lightricks.safetensors"
    save_safetensors(state, lightricks, {"config": json.dumps({"vocoder": theirs})})
    assert vocoder.vocoder_config(lightricks, *read_header(lightricks)) == dict(vocoder.TINY_VOCODER)
    with torch.no_grad():
        assert rel_error(vocoder.load_vocoder(lightricks)(mel), expected) <= 1e-6
    state["vocoder.bwe_generator.conv_pre.weight"] = torch.zeros(1)
    save_safetensors(state, lightricks, {})
    with pytest.raises(CheckpointError, match="bandwidth extension"):
        vocoder.load_vocoder(lightricks)


def test_refuses_a_video_self_attention_mask(files):
    """IC-LoRA's video self-attention mask is refused by name (the USP attention takes no mask)."""
    from usp_video.distributed.models.ltx2.usp import parallelize_ltx2
    from usp_video.distributed.parallel.mesh import SequenceParallel

    model = parallelize_ltx2(ltx2.load_ltx2_transformer(files["split"]), SequenceParallel()).module
    inputs = tiny.tiny_inputs((5, 1, 7), 13, MODELS["split"])
    with pytest.raises(ValueError, match="video_self_attention_mask"), torch.no_grad():
        model(**inputs, video_self_attention_mask=torch.ones(1, 35, 35))
