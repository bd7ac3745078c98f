"""LTX-2's audio stream on N ranks: held whole (what usp-video does) or split? Prints a table, writes JSON.

    python benchmarks/ltx2_bench.py [--out benchmarks/results/ltx2.json] [--quick]

(a) analytic multiply-adds per block of the released LTX-2 19B at 768x512, 121 frames, 5 s of sound (6,144 video
    tokens, 126 audio tokens, 256 text tokens): the video stream's (split over the ranks) and the audio stream's
    (repeated on every rank when held whole), and the share of each rank's work the repeated audio is at N ranks;
(b) measured on this CPU, one process: the forward of a narrowed model (the released depth ratios and token counts,
    widths / 8) with and without its audio tokens, against (a)'s count for the same narrowed shapes: does the
    count predict the time?
(c) bytes each rank sends per block (bf16 activations, fp32 partials): our video-to-audio merge (all-reduces of
    each rank's partial attention over the audio queries, rescaled by its log-sum-exp) beside all-gathering those
    partials instead (N - 1 copies), all-gathering the video keys and values (the pitfall), and the video
    self-attention's Ulysses all-to-all for scale.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RELEASED = dict(video=(32, 128), audio=(32, 64), text=3840, layers=48)
TOKENS = dict(video=16 * 16 * 24, audio=126, text=256)  # (121 - 1) / 8 + 1 frames x 512/32 x 768/32; 5 s x 25/s


def block_macs(d: int, da: int, s: int, la: int, t: int) -> dict:
    """Multiply-adds of one block (batch 1): 'video' grows with the video tokens (split over the ranks), 'audio'
    is the audio stream's own work (every rank repeats it when the audio is held whole), 'text' the video text
    cross-attention's keys and values (every rank repeats them whichever way the audio goes)."""
    video = (4 * s * d * d + 2 * s * s * d          # self-attention: q, k, v, out; scores and values
             + 2 * s * d * d + 2 * s * t * d        # text cross-attention: q, out; scores and values
             + 2 * s * d * da + 2 * s * la * da     # audio-to-video: q, out; scores and values
             + 2 * s * d * da + 2 * la * s * da     # video-to-audio: the video's k, v; scores and values
             + 8 * s * d * d)                       # feed-forward (4x)
    audio = (4 * la * da * da + 2 * la * la * da    # audio self-attention
             + 2 * la * da * da + 2 * t * da * da + 2 * la * t * da  # audio text cross-attention (k, v of the text)
             + 2 * la * da * da                     # audio-to-video: the audio's k, v
             + 2 * la * da * da                     # video-to-audio: q, out
             + 8 * la * da * da)                    # audio feed-forward
    text = 2 * t * d * d                            # the video's text k, v (the text is whole on every rank)
    return {"video": video, "audio": audio, "text": text}


def bytes_per_block(n: int, d: int, heads_a: int, dim_a: int, s: int, la: int, elem: int = 2) -> dict:
    shard = -(-s // n)
    return {"video_self_attention_all_to_all": 4 * (n - 1) * shard * d * elem // n,
            # ring all-reduces of the log-sum-exps' maximum and of the rescaled partials with their weights (fp32)
            "video_to_audio_partials": 2 * (n - 1) * la * heads_a * (dim_a + 2) * 4 // n,
            "partials_all_gather_instead": (n - 1) * la * heads_a * (dim_a + 1) * 4,
            "video_kv_all_gather_instead": (n - 1) * shard * 2 * heads_a * dim_a * elem}


def analytic() -> dict:
    d, da = (h * w for h, w in (RELEASED["video"], RELEASED["audio"]))
    macs = block_macs(d, da, TOKENS["video"], TOKENS["audio"], TOKENS["text"])
    rows = {}
    for n in (1, 2, 4, 8):
        per_rank = macs["video"] / n + macs["audio"] + macs["text"]
        rows[n] = {"audio_share_of_rank_work": macs["audio"] / per_rank,
                   # what splitting the audio would save at most (its compute; not counting its own collectives)
                   "split_audio_saves_at_most": macs["audio"] * (1 - 1 / n) / per_rank,
                   "bytes": bytes_per_block(n, d, *RELEASED["audio"], TOKENS["video"], TOKENS["audio"])}
    return {"block_gmacs": {k: v / 1e9 for k, v in macs.items()}, "ranks": rows}


def measured(repeats: int) -> dict:
    """The narrowed model's forward with 126 audio tokens and with 1, one process, one thread, in CPU seconds
    (process time: on a shared machine, wall time mostly measures the neighbours)."""
    from diffusers import LTX2VideoTransformer3DModel
    from usp_video.distributed.models.ltx2.dit import LTX2_VARIANTS
    from usp_video.distributed.models.ltx2.tiny import tiny_inputs

    config = dict(LTX2_VARIANTS["ltx-2-19b"], num_attention_heads=4, cross_attention_dim=512, audio_num_attention_heads=4,
                  audio_cross_attention_dim=256, num_layers=2, caption_channels=64)
    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(**config).eval()
    shape, text = (16, 16, 24), 256
    times = {}
    for audio in (TOKENS["audio"], 1):
        inputs = tiny_inputs(shape, audio, config, text_len=text)
        runs = []
        with torch.no_grad():
            model(**inputs)
            for _ in range(repeats):
                start = time.process_time()  # CPU time: the machine's other work does not count
                model(**inputs)
                runs.append(time.process_time() - start)
        times[audio] = min(runs)  # the least disturbed run
    with_audio, without = times[TOKENS["audio"]], times[1]
    d, da = 4 * 128, 4 * 64
    full = block_macs(d, da, 16 * 16 * 24, TOKENS["audio"], text)
    one = block_macs(d, da, 16 * 16 * 24, 1, text)
    counted = (sum(full.values()) - sum(one.values())) / sum(full.values())
    return {"seconds_with_audio": with_audio, "seconds_audio_1_token": without,
            "measured_audio_share": (with_audio - without) / with_audio, "counted_audio_share": counted,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ltx2.json"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"a_analytic": analytic(), "b_measured": measured(1 if args.quick else 4)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    a = report["a_analytic"]
    print(f"(a) LTX-2 19B block, 6144 video / 126 audio / 256 text tokens: video {a['block_gmacs']['video']:.1f} "
          f"GMAC, audio {a['block_gmacs']['audio']:.2f} GMAC, text k/v {a['block_gmacs']['text']:.2f} GMAC")
    for n, row in a["ranks"].items():
        b = row["bytes"]
        print(f"    N={n}: whole audio = {100 * row['audio_share_of_rank_work']:.2f} % of a rank's work (split audio "
              f"saves at most {100 * row['split_audio_saves_at_most']:.2f} %); per block: video-to-audio "
              f"partials {b['video_to_audio_partials'] / 1e6:.2f} MB (gathered: "
              f"{b['partials_all_gather_instead'] / 1e6:.2f} MB) vs video K/V gather "
              f"{b['video_kv_all_gather_instead'] / 1e6:.2f} MB; Ulysses all-to-all "
              f"{b['video_self_attention_all_to_all'] / 1e6:.2f} MB")
    m = report["b_measured"]
    print(f"(b) narrowed model (widths / 8), one process, {m['threads']} thread, CPU time: {m['seconds_with_audio']:.2f} s with "
          f"audio, {m['seconds_audio_1_token']:.2f} s with 1 audio token: audio = {100 * m['measured_audio_share']:.2f} % "
          f"measured, {100 * m['counted_audio_share']:.2f} % counted")


if __name__ == "__main__":
    main()
