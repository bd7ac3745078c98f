"""What adding a model family costs, checked.

A copy of the pack in a temporary folder gains a toy family, "Toy Wan": the Wan 2.1 package copied under a new
name (distributed/models/toywan/), with a few lines appended to its __init__.py that rename it and give it plan
names of its own. Nothing outside that package is written. The toy family then runs through

- the engine (one process): detected by name, its tiny set loaded and sampled; the latent equals Wan 2.1's on
  the same weights, and its VAE decode runs;
- the nodes' shared code, on a launched 1-rank group: the loader socket, the sampler run with its LATENT tag, the
  generic USP Text Encode and USP Sampler nodes (the same latent), the family-neutral USP VAE nodes;
- the command line: `usp-video plan` offers it, `usp-video demo --model toywan` makes a video on 2 ranks.

If a layer outside the family packages knew the families by name (a second registry, a branch on a family's
name, a family's facts in a shared module), the toy would be refused or run as another family there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# appended to the copied wan21/__init__.py: the family under its own name (and nothing else changed)
TOY_FAMILY = '''

class ToyWan(Wan21):
    """Wan 2.1 under another name: the toy family of tests/test_new_family.py."""

    name, label, short_name = "toywan", "Toy Wan", "toywan"
    order = 90
    claims_files = False  # its files look exactly like Wan 2.1's: it is chosen by name, as Wan 2.2 A14B is
    comfy_model_configs = ()
    plan_variants = {"toywan": Wan21.plan_variants["wan-1.3b"]}
    reference_times = {}


FAMILY = ToyWan()
'''

ENGINE_AND_NODES = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch

    from usp_video.distributed import models
    from usp_video.distributed.config import GroupConfig
    from usp_video.distributed.engine import Engine
    from usp_video.distributed.registry import free_group
    from usp_video.distributed.requests import EncodeRequest, SampleRequest

    root = Path(sys.argv[1])
    toy = models.get("toywan")
    assert type(toy).__module__ == "usp_video.distributed.models.toywan", type(toy).__module__
    files = {name: str(path) for name, path in toy.make_tiny(root).items()}
    assert models.detect_dit(files["dit"], "toywan") is toy
    assert models.detect_dit(files["dit"]).name == "wan2.1"  # chosen by name only

    # the engine, in this process
    engine = Engine(GroupConfig(dtype="fp32"))
    cond = engine.encode(EncodeRequest(family="toywan", prompt="a cat", files={"text_encoder": files["text_encoder"]}))
    def request(family):
        return SampleRequest(experts=[files["dit"]], family=family, positive=cond, negative=None,
                             latent=torch.zeros(1, 16, 3, 4, 6), seed=7, steps=3, cfg=1.0, shift=5.0, sampler="euler")
    toy_run = engine.sample(request("toywan"))
    wan_run = engine.sample(request("wan2.1"))
    assert toy_run.latent.abs().sum() > 0
    assert torch.equal(toy_run.latent, wan_run.latent), "the toy family is Wan 2.1 under another name"
    frames = engine.decode(files["vae"], toy_run.latent)
    assert frames.shape == (9, 32, 48, 3), frames.shape
    print("engine: toywan == wan2.1, decoded", tuple(frames.shape))

    # the nodes' shared code, on a launched group
    import os
    os.environ["USP_VIDEO_MODELS_DIR"] = str(root)
    from usp_video.distributed import api
    from usp_video.nodes.model_socket import load_model
    from usp_video.nodes.sampler_run import run_sampler
    from usp_video.nodes.loaders import UspTextEncode
    from usp_video.nodes.samplers import UspSampler
    from usp_video.nodes.vae_nodes import UspVaeDecode, UspVaeLoader
    group = GroupConfig(ranks=1, threads_per_rank=1)
    try:
        socket, info = load_model(group, Path(files["dit"]).name, "toywan")
        assert socket["info"]["family"] == "toywan", socket["info"]
        positive = api.encode(group, "toywan", {"text_encoder": files["text_encoder"]}, "a cat")
        (latent,) = run_sampler(socket, {"samples": torch.zeros(1, 16, 3, 4, 6)}, None, positive=positive,
                                negative=None, seed=7, steps=3, cfg=1.0, shift=5.0, sampler="euler", denoise=1.0)
        assert latent["usp_family"] == "toywan", latent.get("usp_family")
        torch.testing.assert_close(latent["samples"], toy_run.latent, rtol=1e-5, atol=1e-6)
        # the generic text encode and sampler on the toy socket: the same latent, tagged
        text_encoder = {"group": group, "family": "toywan", "files": {"text_encoder": files["text_encoder"]}}
        conditioning = UspTextEncode.execute(text_encoder=text_encoder, text="a cat").args[0]
        (generic,) = UspSampler.execute(model=socket, seed=7, steps=3, cfg=1.0, sampler_name="euler",
                                        positive=conditioning, negative=conditioning,
                                        latent_image={"samples": torch.zeros(1, 16, 3, 4, 6)}, denoise=1.0,
                                        shift=5.0).args
        assert generic["usp_family"] == "toywan", generic.get("usp_family")
        assert torch.equal(generic["samples"], latent["samples"])
        (vae,) = UspVaeLoader.execute(group=group, vae_name=Path(files["vae"]).name).args
        (image,) = UspVaeDecode.execute(vae=vae, samples=latent).args
        assert image.shape == (9, 32, 48, 3), image.shape
        print("nodes: toywan latent tagged and decoded", tuple(image.shape))
    finally:
        free_group()
''')


def _copy_pack(dest: Path) -> None:
    """The repository's files (tracked, and new ones git does not ignore: the working tree as it would be
    committed), without the tests."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if name.startswith(("tests/", ".ci/")) or not (REPO / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)


@pytest.fixture(scope="module")
def toy_pack(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("toy-family")
    pack = tmp / "pack"
    pack.mkdir()
    _copy_pack(pack)
    # imported through a symbolic link, as a pack linked into ComfyUI's custom_nodes is (the ranks' entry script
    # must then still keep its own folder off sys.path: distributed/requests.py would shadow `requests`)
    (tmp / "imports").mkdir()
    (tmp / "imports" / "usp_video").symlink_to(pack, target_is_directory=True)
    before = {p.relative_to(pack): p.read_bytes() for p in pack.rglob("*") if p.is_file()}
    # the whole change: a family package (a copy of Wan 2.1's, renamed)
    family = pack / "distributed" / "models" / "toywan"
    shutil.copytree(pack / "distributed" / "models" / "wan21", family)
    with open(family / "__init__.py", "a") as f:
        f.write(TOY_FAMILY)
    changed = sorted(str(p.relative_to(pack)) for p in pack.rglob("*") if p.is_file()
                     and before.get(p.relative_to(pack)) != p.read_bytes())
    assert all(name.startswith("distributed/models/toywan/") for name in changed), changed
    # the copy, not the installed pack, is `usp_video` for every process started below (Python searches
    # PYTHONPATH before the editable install's finder)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp / "imports"),
                                                                    os.environ.get("PYTHONPATH")])))
    return {"tmp": tmp, "env": env}


def _run(toy_pack: dict, args: list[str], timeout: float = 300) -> str:
    result = subprocess.run([sys.executable, *args], env=toy_pack["env"], cwd=toy_pack["tmp"], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{args[:2]}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def test_toy_family_runs_through_the_engine_and_the_nodes(toy_pack):
    out = _run(toy_pack, ["-c", ENGINE_AND_NODES, str(toy_pack["tmp"] / "models")])
    assert "engine: toywan == wan2.1" in out and "nodes: toywan latent tagged" in out, out


def test_toy_family_runs_through_the_command_line(toy_pack):
    # the copy is what runs: its planner offers the toy family
    plan = _run(toy_pack, ["-m", "usp_video.distributed.cli", "plan", "--model", "toywan", "--gpus", "2",
                           "--size", "832x480x33"])
    assert "Wan 2.1 T2V 1.3B" in plan, plan
    video = toy_pack["tmp"] / "toy.webp"
    demo = _run(toy_pack, ["-m", "usp_video.distributed.cli", "demo", "--model", "toywan", "--ranks", "2",
                           "--models-dir", str(toy_pack["tmp"] / "demo-models"), "--out", str(video)])
    assert "tiny Toy Wan model set" in demo, demo
    assert video.stat().st_size > 0
