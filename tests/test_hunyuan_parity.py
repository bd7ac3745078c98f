"""HunyuanVideo on one process against diffusers' stock model, fed text padded with masked tokens as the
reference pipeline pads it (our model crops the padding). N ranks against one process: test_parity.py."""

import torch

from conftest import rel_error
from parity_targets import hunyuan_forward, make_engine

UNEVEN = (5, 2, 14)  # 5 x 1 x 7 = 35 video tokens
EVEN = (3, 4, 8)     # 3 x 2 x 4 = 24 video tokens
TEXT_WHOLE, TEXT_SHARDED = 7, 12  # the text lengths the N-rank cases use


def test_world_size_one_matches_stock_diffusers(tiny_hunyuan):
    from usp_video.distributed.models.hunyuan_video.dit import load_hunyuan_transformer

    stock = load_hunyuan_transformer(tiny_hunyuan["dit"])  # diffusers' own attention processors
    model = make_engine().dit(tiny_hunyuan["dit"])
    for shape in (UNEVEN, EVEN):
        for text_len in (TEXT_WHOLE, TEXT_SHARDED):
            expected = hunyuan_forward(stock, shape, text_len)
            assert expected.abs().max() > 0
            assert rel_error(hunyuan_forward(model, shape, text_len), expected) <= 1e-6
