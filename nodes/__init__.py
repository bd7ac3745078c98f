"""ComfyUI nodes (classic V1 API): thin adapters over distributed.api."""

from .group_node import UspFreeGroup, UspGroupNode
from .hunyuan_nodes import UspHunyuanModelLoader, UspHunyuanSampler, UspHunyuanTextEncode, UspHunyuanTextEncoderLoader
from .wan_nodes import (UspTextEncode, UspTextEncoderLoader, UspVaeDecode, UspVaeLoader, UspWanModelLoader,
                        UspWanSampler)

NODE_CLASS_MAPPINGS = {
    "UspGroup": UspGroupNode,
    "UspFreeGroup": UspFreeGroup,
    "UspWanModelLoader": UspWanModelLoader,
    "UspTextEncoderLoader": UspTextEncoderLoader,
    "UspTextEncode": UspTextEncode,
    "UspWanSampler": UspWanSampler,
    "UspVaeLoader": UspVaeLoader,
    "UspVaeDecode": UspVaeDecode,
    "UspHunyuanModelLoader": UspHunyuanModelLoader,
    "UspHunyuanTextEncoderLoader": UspHunyuanTextEncoderLoader,
    "UspHunyuanTextEncode": UspHunyuanTextEncode,
    "UspHunyuanSampler": UspHunyuanSampler,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "UspGroup": "USP Group (GPUs / ranks)",
    "UspFreeGroup": "USP Free Group",
    "UspWanModelLoader": "USP Load Wan 2.1 Model",
    "UspTextEncoderLoader": "USP Load Text Encoder (UMT5)",
    "UspTextEncode": "USP Text Encode (Wan)",
    "UspWanSampler": "USP Sampler (Wan 2.1)",
    "UspVaeLoader": "USP Load VAE (Wan / HunyuanVideo)",
    "UspVaeDecode": "USP VAE Decode",
    "UspHunyuanModelLoader": "USP Load HunyuanVideo Model",
    "UspHunyuanTextEncoderLoader": "USP Load Text Encoders (HunyuanVideo)",
    "UspHunyuanTextEncode": "USP Text Encode (HunyuanVideo)",
    "UspHunyuanSampler": "USP Sampler (HunyuanVideo)",
}
