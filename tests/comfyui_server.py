"""Start a real ComfyUI (COMFYUI_DIR) with this pack and the tiny models, for integration tests."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def comfyui_python() -> str:
    """The Python that has ComfyUI's requirements (and this pack) installed: COMFYUI_PYTHON, else this one."""
    return os.environ.get("COMFYUI_PYTHON", sys.executable)


def group_dir(work: Path) -> Path:
    """Where the server started in `work` puts its groups' run folders (its TMPDIR)."""
    return work / "tmp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def comfyui_server(comfy_dir: str, models_root: Path, work: Path, extra_args: tuple[str, ...] = (),
                   stop_with_sigterm: bool = False, test_nodes: bool = False):
    """Yields the server URL. The pack is linked into a private custom_nodes folder under a
    folder name that is not a module name, as users install it. extra_args: more of main.py's flags.
    At the end the server gets Ctrl-C's SIGINT (its process group, as a terminal sends it), or with
    stop_with_sigterm a SIGTERM to its own process only (what `kill PID` or a service manager sends). test_nodes:
    tests/comfyui_test_nodes beside the pack (the tiny CLIP vision loader)."""
    custom_nodes = work / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / "ComfyUI-usp-video"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    if test_nodes and not (custom_nodes / "usp_video_test_nodes").exists():
        (custom_nodes / "usp_video_test_nodes").symlink_to(Path(__file__).parent / "comfyui_test_nodes")
    (work / "output").mkdir(exist_ok=True)
    config = work / "extra_model_paths.yaml"
    config.write_text(f"usp_video_test:\n    base_path: {models_root}\n    diffusion_models: diffusion_models\n"
                      f"    text_encoders: text_encoders\n    vae: vae\n    loras: loras\n    clip_vision: clip_vision\n    custom_nodes: {custom_nodes}\n")
    port = free_port()
    python = comfyui_python()
    # The server's temporary files, the run folders of the groups it starts among them, go under work/:
    # the groups of this server are then the processes whose command line names group_dir(work).
    group_dir(work).mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(group_dir(work)))
    log = open(work / "comfyui.log", "wb")
    proc = subprocess.Popen([python, str(Path(comfy_dir) / "main.py"), "--cpu", "--listen", "127.0.0.1",
                             "--port", str(port), "--extra-model-paths-config", str(config),
                             "--output-directory", str(work / "output"), "--disable-auto-launch", *extra_args],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ComfyUI exited at start:\n" + (work / "comfyui.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(url + "/object_info/UspGroup", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("ComfyUI did not start in 180 s:\n" + (work / "comfyui.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            if stop_with_sigterm:
                os.kill(proc.pid, signal.SIGTERM)  # the pack's handler stops the group, then ComfyUI ends
            else:
                os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C: ComfyUI exits, its atexit stops our group
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def log_text(work: Path) -> str:
    return (work / "comfyui.log").read_text(errors="replace")
