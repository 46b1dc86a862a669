"""What a backbone is, without its weights: its input, its output widths and its cost per view.

The model is built on PyTorch's meta device (shapes only: no weights, no memory, no arithmetic,
no download) and one view at its input size is run through it. GFLOPs are counted, not copied:
`torch.utils.flop_counter.FlopCounterMode` adds up every matrix product and convolution from its
shapes (a multiply-add counts as 2 FLOPs, so GFLOPs = 2 x GMACs). On the meta device,
scaled_dot_product_attention decomposes into matrix products, so attention is counted too.
Preprocessing and the element-wise work (norms, activations) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .backbones import _trunk, build_random, get_spec
from .dataset import DECODE_SIZE
from .preprocess import plan_from_transform


@dataclass(frozen=True)
class Description:
    name: str
    library: str
    model: str
    tag: str | None
    input_size: tuple[int, int]
    preprocessing: dict  # the eval transform for DECODE_SIZE views (preprocess.Plan.record)
    data_config: dict  # what the library says about the input
    output_dims: dict[str, int]  # dataset -> width
    gflops: float  # per view, model forward only
    default_weights: str | None
    licence: str | None
    random_init: bool


def describe(name: str, layers: int = 0) -> Description:
    spec = get_spec(name)
    with torch.device("meta"):
        built = build_random(spec)
        # no parameter asks for gradients: FlopCounterMode's module tracker trips over views of
        # trainable leaves made under no_grad (timm's attention pooling expands one)
        trunk = _trunk(spec, built.tower, layers).eval().requires_grad_(False)
    plan = plan_from_transform(built.transform, (DECODE_SIZE, DECODE_SIZE))
    view = torch.zeros(1, 3, *plan.output_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = trunk(view)
    return Description(
        name=spec.name, library=spec.library, model=spec.model, tag=spec.tag, input_size=plan.output_size,
        preprocessing=plan.record(), data_config=built.data_config,
        output_dims={k: int(v.shape[-1]) for k, v in out.items()}, gflops=counter.get_total_flops() / 1e9,
        default_weights=spec.default_weights, licence=spec.entry.licence if spec.entry else None,
        random_init=spec.random_init,
    )
