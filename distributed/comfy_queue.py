"""`usp-video queue`: run an API-format workflow on a ComfyUI server from a script.

POST /prompt, follow the run over the websocket (/ws?clientId=...; polling /history where the
websocket-client package is absent), report node errors with the node's id and type, on Ctrl-C
remove or interrupt its own prompt only (POST /queue delete, POST /interrupt with its prompt_id), and
download every output file (GET /view) into a folder.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable


class QueueError(RuntimeError):
    """The server rejected the prompt or a node failed; the message says which."""


def load_workflow(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON workflow ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise ValueError(f"{path.name} is a UI-format workflow; queue the API-format file (ComfyUI: "
                         "Workflow > Export (API)), e.g. workflows/api/wan21_t2v_usp_api.json")
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise ValueError(f"{path.name} is not an API-format workflow ({{id: {{class_type, inputs}}}})")
    return data


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(prompt: dict, overrides: list[str]) -> dict:
    """--set NODE.INPUT=VALUE, NODE being a node id, a node title or a class_type used once.
    VALUE keeps the type of the input it replaces: text for text inputs, else parsed as JSON
    when it can be (numbers, true/false), else taken as text."""
    prompt = json.loads(json.dumps(prompt))
    for item in overrides:
        target, sep, value = item.partition("=")
        node_ref, dot, name = target.rpartition(".")
        if not sep or not dot or not node_ref or not name:
            raise ValueError(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. 7.steps=20")
        if node_ref in prompt:
            node_id = node_ref
        else:
            matches = [k for k, v in prompt.items()
                       if v.get("_meta", {}).get("title") == node_ref or v["class_type"] == node_ref]
            if len(matches) != 1:
                known = ", ".join(f"{k} ({v['class_type']})" for k, v in prompt.items())
                raise ValueError(f"--set {item!r}: node {node_ref!r} matches {len(matches)} nodes; use an id: {known}")
            node_id = matches[0]
        inputs = prompt[node_id]["inputs"]
        if name not in inputs:
            raise ValueError(f"--set {item!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input "
                             f"{name!r}; it has {', '.join(inputs)}")
        # a text input (a prompt, a file name, a combo choice such as "3") stays text
        inputs[name] = value if isinstance(inputs[name], str) else _parse_value(value)
    return prompt


class ComfyServer:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _request(self, path: str, data: dict | None = None) -> dict:
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                detail = json.loads(raw)
            except ValueError:
                detail = raw.decode(errors="replace")
            raise QueueError(describe_rejection(detail)) from None
        except urllib.error.URLError as exc:
            raise QueueError(f"cannot reach ComfyUI at {self.url}: {exc.reason}") from None
        return json.loads(raw) if raw else {}

    def queue(self, prompt: dict, client_id: str) -> str:
        return self._request("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]

    def history(self, prompt_id: str) -> dict:
        return self._request(f"/history/{prompt_id}").get(prompt_id, {})

    def cancel(self, prompt_id: str) -> None:
        """Stop this prompt only: drop it from the queue if it is still pending, interrupt it if it
        runs (POST /interrupt with a prompt_id interrupts nothing else; without one it would stop
        whatever runs, another client's prompt too)."""
        self._request("/queue", {"delete": [prompt_id]})
        self._request("/interrupt", {"prompt_id": prompt_id})

    def download(self, file: dict, out_dir: Path) -> Path:
        query = urllib.parse.urlencode({k: file.get(k, "") for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=self.timeout) as resp:
            data = resp.read()
        path = out_dir / file.get("subfolder", "") / file["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def describe_rejection(detail) -> str:
    if not isinstance(detail, dict):
        return f"ComfyUI rejected the prompt: {detail}"
    error = detail.get("error", {})
    lines = [f"ComfyUI rejected the prompt: {error.get('message', '')} {error.get('details', '')}".strip()]
    for node_id, node in (detail.get("node_errors") or {}).items():
        for err in node.get("errors", []):
            lines.append(f"  node {node_id} ({node.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "\n".join(lines)


def _follow_websocket(server: ComfyServer, client_id: str, prompt_id_box: list, on_event: Callable[[dict], None],
                      submit: Callable[[], str]) -> str:
    import websocket

    ws_url = server.url.replace("http://", "ws://").replace("https://", "wss://") + f"/ws?clientId={client_id}"
    ws = websocket.create_connection(ws_url, timeout=server.timeout)
    try:
        prompt_id = submit()  # after connecting, so that no event is missed
        prompt_id_box.append(prompt_id)
        on_event({"type": "queued", "data": {"prompt_id": prompt_id}})
        ws.settimeout(None)
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                continue  # binary preview images
            event = json.loads(message)
            data = event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            on_event(event)
            kind = event.get("type")
            if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return "success"
            if kind == "execution_success":
                return "success"
            if kind == "execution_error":
                raise QueueError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                 f"{data.get('exception_type')}: {data.get('exception_message')}")
            if kind == "execution_interrupted":
                return "interrupted"
    finally:
        ws.close()


def _follow_polling(server: ComfyServer, prompt_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.history(prompt_id)
        status = entry.get("status", {})
        if status.get("completed") or status.get("status_str") == "error":
            for kind, data in status.get("messages", []):
                if kind == "execution_error":
                    raise QueueError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                     f"{data.get('exception_type')}: {data.get('exception_message')}")
                if kind == "execution_interrupted":
                    return "interrupted"
            return "success"
        time.sleep(0.5)
    raise QueueError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def run_workflow(server_url: str, prompt: dict, out_dir: Path, timeout: float = 3600.0,
                 on_event: Callable[[dict], None] | None = None) -> tuple[str, list[Path]]:
    """Queue prompt, wait for it, download its outputs. Returns (status, files)."""
    server = ComfyServer(server_url)
    client_id = uuid.uuid4().hex
    on_event = on_event or (lambda event: None)
    box: list[str] = []
    try:
        try:
            import websocket  # noqa: F401
            status = _follow_websocket(server, client_id, box, on_event, lambda: server.queue(prompt, client_id))
        except ImportError:
            box.append(server.queue(prompt, client_id))
            on_event({"type": "queued", "data": {"prompt_id": box[0]}})
            status = _follow_polling(server, box[0], timeout)
    except KeyboardInterrupt:
        if box:  # this prompt only: other clients' prompts run on
            server.cancel(box[0])
        raise
    files = []
    if status == "success":
        # ComfyUI sends execution_success before its prompt worker writes the history entry: wait for it
        entry, deadline = server.history(box[0]), time.monotonic() + 30.0
        while not entry.get("status", {}).get("completed") and time.monotonic() < deadline:
            time.sleep(0.1)
            entry = server.history(box[0])
        for node_output in entry.get("outputs", {}).values():
            for items in node_output.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item and item.get("type") == "output":
                        files.append(server.download(item, out_dir))
    return status, files


def queue_command(args) -> None:
    """`usp-video queue`: run the workflow, print its progress and the files it wrote."""
    prompt = apply_overrides(load_workflow(args.workflow), args.set or [])

    def show(event: dict) -> None:
        data = event.get("data", {})
        if event.get("type") == "queued":
            print(f"queued prompt {data.get('prompt_id')}", flush=True)
        elif event.get("type") == "progress":
            print(f"node {data.get('node')}: {data.get('value')}/{data.get('max')}", flush=True)
        elif event.get("type") == "executing" and data.get("node") is not None:
            print(f"running node {data['node']} ({prompt.get(data['node'], {}).get('class_type', '?')})", flush=True)

    status, files = run_workflow(args.server, prompt, Path(args.out_dir), timeout=args.timeout, on_event=show)
    if status == "interrupted":
        raise RuntimeError("the prompt was interrupted")
    for path in files:
        print(f"output: {path}")
    if not files:
        print("the workflow finished without output files")


def add_parser(sub) -> None:
    """The `queue` command's arguments (cli.py builds the command line)."""
    p = sub.add_parser("queue", help="run an API-format workflow on a ComfyUI server and download its outputs")
    p.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/wan21_t2v_usp_api.json)")
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is an id, a title or a class_type (repeatable)")
    p.add_argument("--out-dir", default="usp-video-outputs")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait without a websocket")
    p.set_defaults(func=queue_command)
