"""Writes the generated tables of docs/*.md from the files that hold their numbers: the benchmark tables from
benchmarks/results/*.json, the defaults table from the families' `Defaults`, the USP Sampler node's widget
defaults and the shipped API workflows. Nothing in these tables is typed by hand.

    python docs/generate.py           # rewrite the tables in place
    python docs/generate.py --check   # exit 1 (and name the stale tables) when a file differs from what it makes

A table sits between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`; `tests/test_docs.py` runs
the check, so a results file rerun without `python docs/generate.py` fails CI.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _e(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def cpu() -> str:
    d = _load("cpu.json")
    a, s, one = d["a_scaling"], d["c_sidecar"], d["d_degree_one"]
    u, r = a["ulysses2"], a["ring2"]
    rows = [
        [f"one DiT forward, Wan-shaped, {a['tokens']} tokens: 1 rank x 1 thread", f"{a['one_rank_1_thread']:.2f} s"],
        ["2 ranks x 1 thread, Ulysses 2 / Ring 2",
         f"{u['seconds']:.2f} s / {r['seconds']:.2f} s: {u['speedup_vs_1_rank']:.2f}x / {r['speedup_vs_1_rank']:.2f}x, "
         f"efficiency {u['efficiency']:.0%} / {r['efficiency']:.0%}"],
        ["2 ranks vs 1 rank, latent rel. error (Ulysses 2 / Ring 2)",
         f"{_e(u['rel_error_vs_1_rank'])} / {_e(r['rel_error_vs_1_rank'])}"],
        ["stock diffusers in one process, 2 threads",
         f"{a['stock_2_threads']:.2f} s (our 2 ranks: {u['speedup_vs_stock_2_threads']:.2f}x / "
         f"{r['speedup_vs_stock_2_threads']:.2f}x its speed)"],
    ]
    for c in d["b_comm_bytes"]:
        rows.append([f"bytes sent per rank per forward, u{c['ulysses']} x r{c['ring']}, {c['tokens']} tokens: "
                     "counted at the collectives / analytic", f"ratio {c['ratio']:.4f}"])
    rows.append([f"sidecar overhead per sampler call (client wall time minus rank compute, {s['calls']} calls)",
                 f"{s['overhead_ms_per_call']:.1f} ms"])
    for name, t in s["transfers"].items():
        rows.append([f"moving {name} ({t['megabytes']:.1f} MB) over the channel, one way",
                     f"{t['ms_one_way']:.1f} ms ({t['gb_per_s']:.2f} GB/s)"])
    rows.append(["world size 1: our model vs stock diffusers, same weights and threads",
                 f"{one['ratio_ours_over_stock']:.2f}x the time, rel. error {_e(one['rel_error'])}"])
    m = d["machine"]
    return f"Machine: {m['cpus']} CPU cores, torch {m['torch']}; the run took {d['wall_seconds']:.0f} s.\n\n" + \
        _table(["what", "result"], rows)


def gpu() -> str:
    d = _load("gpu_h100.json")
    rows = [[k["backend"], k["dtype"], _e(k["out_rel_err"]), _e(k["lse_max_abs_err"]), _e(k["ring_merge_rel_err"])]
            for k in d["kernels"]]
    out = f"Device: {d['device']}, torch {d['torch']}; the run took {d['wall_s']:.0f} s.\n\n"
    out += "Attention kernels against an fp64 reference:\n\n"
    out += _table(["kernel", "dtype", "output rel. error", "log-sum-exp max abs error", "ring merge rel. error"], rows)
    out += "\nOne Wan 1.3B-shaped forward (world size 1, bf16):\n\n"
    out += _table(["model", "forward", "step with CFG", "time vs stock", "rel. error vs stock"],
                  [[s["model"], f"{s['forward_s']:.3f} s", f"{s['step_s_cfg']:.3f} s", f"{s['vs_stock']:.3f}",
                    _e(s["rel_err_vs_stock"])] for s in d["step"]])
    f = d["fp8"]
    out += "\nThe blocks' weights stored in fp8 and cast per layer, against the same weights dequantized:\n\n"
    out += _table(["fp8 forward", "dequantized forward", "time ratio", "parameter bytes ratio", "rel. error"],
                  [[f"{f['fp8_forward_s']:.3f} s", f"{f['dequantized_forward_s']:.3f} s", f"{f['time_ratio']:.2f}",
                    f"{f['bytes_ratio']:.2f}", _e(f["rel_err"])]])
    return out


def cache() -> str:
    d = _load("cache.json")
    rows = [[r["ranks"], r["cache"], "-" if r["threshold"] is None else r["threshold"],
             f"{len(r['skipped_steps'])}/{d['steps']}", f"{r['seconds']:.2f}", f"{r['time_ratio']:.2f}",
             _e(r["rel_diff_vs_no_cache"])] for r in d["runs"]]
    c = d["dit_config"]
    head = (f"Wan-shaped DiT ({c['num_attention_heads']} x {c['attention_head_dim']} heads, {c['num_layers']} blocks), "
            f"latent {d['latent_shape']}, {d['steps']} {d['sampler']} steps, cfg {d['cfg']}:\n\n")
    return head + _table(["ranks", "cache", "threshold", "steps skipped", "seconds", "time vs no cache",
                          "latent rel. diff vs no cache"], rows)


def memory() -> str:
    d = _load("memory.json")
    full = d["full_param_bytes"]
    rows = []
    for r in d["runs"]:
        w, h = r["wan"], r["hunyuan"]
        rows.append([r["ranks"], f"{max(r['param_bytes_per_rank']) / 2**20:.1f} MiB",
                     f"{max(r['fraction_of_full']):.3f}", f"{max(w['peak_mib_per_rank']):.0f} MiB",
                     f"{w['seconds']:.1f} s", f"{max(h['peak_mib_per_rank']):.0f} MiB", f"{h['seconds']:.1f} s",
                     f"{max(w['max_abs_diff_vs_one_rank'], h['max_abs_diff_vs_one_rank']):g}"])
    out = (f"A Wan-shaped DiT of {full / 2**20:.1f} MiB with `shard_weights` on; the VAE decodes split (largest rank "
           f"shown; oneDNN {'on' if d['mkldnn'] else 'off'}):\n\n")
    out += _table(["ranks", "DiT weights per rank", "of the whole (target <= 1/N + 5%)", "Wan-VAE peak per rank",
                   "time", "HunyuanVideo VAE peak per rank", "time", "max abs diff vs 1 rank"], rows)
    for key, what in (("load", "Wan-shaped DiT"), ("load_hunyuan", "HunyuanVideo-shaped DiT"),
                      ("load_llama", "Llama-shaped text encoder")):
        if key not in d:
            continue
        ld = d[key]
        out += (f"\nLoading a {what} of {ld['model_bytes'] / 2**30:.2f} GiB: the peak resident memory each rank "
                "adds, as a fraction of the model (largest rank; the sum over the ranks in brackets), and the "
                "pre-flight's prediction over the measured peak:\n\n")
        rows = []
        for r in ld["runs"]:
            pred = "-" if r["predicted_per_rank"] is None else f"{r['predicted_per_rank'] / max(r['peak_per_rank']):.2f}"
            rows.append([r["ranks"], r["load"], f"{max(r['peak_per_rank']):.2f} ({r['peak_sum']:.2f})",
                         f"{max(r['held_per_rank']):.2f}", pred])
        out += _table(["ranks", "load", "peak per rank (sum)", "held per rank", "pre-flight / measured"], rows)
    return out


def activations() -> str:
    d = _load("activations.json")
    groups: dict[tuple, list[float]] = {}
    for r in d["runs"]:
        groups.setdefault((r["ranks"], r["ulysses"], r["ring"]), []).append(r["ratio"])
    rows = [[k[0], k[1], k[2], len(v), f"{min(v):.2f}", f"{max(v):.2f}"] for k, v in sorted(groups.items())]
    return (f"Models (hidden / FFN width): {', '.join(d['models'])}; {d['dtype']} on {d['device']}; the "
            "prediction over the measured peak a step adds:\n\n"
            + _table(["ranks", "ulysses", "ring", "runs", "prediction / measured, min", "max"], rows))


def redesign() -> str:
    d = _load("redesign_compare.json")
    rows = [[i, f["figure"], f"{f['before']:.3g}", f"{f['after']:.3g}", f"{f['after_over_before']:.2f}"]
            for i, run in enumerate(d["runs"], 1) for f in run]
    return f"{d['what']}; before: {d['before']}; after: {d['after']}.\n\n" + \
        _table(["run", "figure", "before", "after", "after / before"], rows)


def defaults() -> str:
    from usp_video.distributed.models import FAMILIES

    rows = []
    for fam in FAMILIES.values():
        dd = fam.defaults
        cfg = " / ".join(f"{c:g}" for c in dd.cfg_list())
        rows.append([f"{fam.label} (`--model {fam.short_name}`)", dd.sampler, dd.steps, cfg, f"{dd.shift:g}"])
    out = "`usp-video generate` (the family's reference settings, `Defaults` in its package):\n\n"
    out += _table(["family", "sampler", "steps", "cfg", "shift"], rows)
    from usp_video.nodes.samplers import UspSampler, UspSamplerAdvanced

    out += "\nThe sampler nodes' widget defaults (one for every family; `shift` 0: the model's own):\n\n"
    rows = []
    for node in (UspSampler, UspSamplerAdvanced):
        schema = node.define_schema()
        d = {i.id: getattr(i, "default", None) for i in schema.inputs}
        rows.append([schema.display_name, d["sampler_name"], d["steps"], f"{d['cfg']:g}",
                     "the model's" if not d["shift"] else f"{d['shift']:g}"])
    out += _table(["node", "sampler", "steps", "cfg", "shift"], rows)
    out += "\nThe shipped API workflows (`workflows/api/`), their sampler nodes:\n\n"
    rows = []
    for path in sorted((ROOT / "workflows" / "api").glob("*.json")):
        wf = json.loads(path.read_text())
        for nid, node in sorted(wf.items(), key=lambda kv: int(kv[0])):
            if node["class_type"] not in ("UspSampler", "UspSamplerAdvanced"):
                continue
            i = node["inputs"]
            latent = next((n["inputs"] for n in wf.values() if "width" in n["inputs"] and "length" in n["inputs"]), {})
            size = f"{latent.get('width')}x{latent.get('height')}x{latent.get('length')}" if latent else "-"
            shift = i.get("shift", 0)
            rows.append([f"`{path.name}`", f"{node['class_type']} #{nid}", size, i["sampler_name"], i["steps"],
                         f"{i['cfg']:g}" + (f" / {i['cfg_low_noise']:g}" if i.get("cfg_low_noise") else ""),
                         "the model's" if not shift else f"{shift:g}"])
    out += _table(["workflow", "node", "size", "sampler", "steps", "cfg", "shift"], rows)
    return out


def defaults_short() -> str:
    from usp_video.distributed.models import FAMILIES
    from usp_video.nodes.samplers import UspSampler

    d = {i.id: getattr(i, "default", None) for i in UspSampler.define_schema().inputs}
    fams = "; ".join(f"{f.label}: {f.defaults.sampler}, {f.defaults.steps} steps, cfg "
                     f"{' / '.join(f'{c:g}' for c in f.defaults.cfg_list())}, shift {f.defaults.shift:g}"
                     for f in FAMILIES.values())
    return (f"USP Sampler's widgets: {d['sampler_name']}, {d['steps']} steps, cfg {d['cfg']:g}, shift 0 (the model's "
            f"own). `usp-video generate`, per family: {fams}.\n")


def fit() -> str:
    """The pre-flight's prediction per rank for the 14B models (gpu_check's section 4, computed here: no GPU)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check import fit as fit_section
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [[r["model"], r["file"], r["ranks"], f"{r['weights_gib']:.1f}", f"{r['activations_gib']:.1f}",
             f"{r['gib_per_rank']:.1f}"] for r in fit_section.run(None)]
    return _table(["model", "file", "ranks", "weights GiB", "activations GiB", "GiB per rank"], rows)


GENERATORS = {"fit": fit, "defaults-short": defaults_short, "cpu": cpu, "gpu-h100": gpu, "cache": cache, "memory": memory, "activations": activations,
              "redesign": redesign, "defaults": defaults}


def render(text: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in GENERATORS:
            raise SystemExit(f"unknown generated table {name!r}; known: {', '.join(GENERATORS)}")
        return m.group(1) + GENERATORS[name]() + m.group(4)
    return BLOCK.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a table is stale")
    args = ap.parse_args(argv)
    stale = []
    for path in sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]:
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if stale and args.check:
        print("stale generated tables in: " + ", ".join(map(str, stale)) + " (run python docs/generate.py)")
        return 1
    print(("rewrote " + ", ".join(map(str, stale))) if stale else "the generated tables are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
