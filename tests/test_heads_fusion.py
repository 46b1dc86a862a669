"""Every fusion kind (and both presets' classifiers) gets the same masking and batch-independence checks."""

import pytest
import torch
from torch import nn

from geoscout.heads.fusion import FUSIONS, AttentionFusion, ConcatFusion, FusionConfig, TransformerFusion, build_fusion
from geoscout.heads.models import ClassifierConfig, Scout, Sniper
from geoscout.heads.presets import default_classifier, recipe, seed_clip_classifier, seed_convnext_classifier

D = 16

FUSION_CONFIGS = {
    "mean": FusionConfig(kind="mean", width=8),
    "mean-no-projection": FusionConfig(kind="mean", width=None, input_norm=False),
    "transformer-mean": FusionConfig(kind="transformer", width=8, heads=2, ffn_dim=16),
    "transformer-concat": FusionConfig(kind="transformer", width=None, heads=2, ffn_dim=16, pooling="concat",
                                       direction_embeddings=False, norm_first=False, input_norm=False),
    "concat": FusionConfig(kind="concat", width=None, input_norm=False),
    "attention": FusionConfig(kind="attention", width=None, input_norm=False),
    "attention-projected": FusionConfig(kind="attention", width=8),
    "concat-projected": FusionConfig(kind="concat", width=8),
}


def _modules():
    torch.manual_seed(0)
    for name, config in FUSION_CONFIGS.items():
        yield name, build_fusion(config, D)
    for name, make in (("default", default_classifier), ("seed-clip", seed_clip_classifier), ("seed-convnext", seed_convnext_classifier)):
        config = make()
        config.fusion.heads = 2
        yield f"{name}-classifier", Scout(config, D, num_cells=5)


MODULES = dict(_modules())


def test_registry_covers_every_kind():
    assert {c.kind for c in FUSION_CONFIGS.values()} == set(FUSIONS)
    with pytest.raises(ValueError, match="available"):
        build_fusion(FusionConfig(kind="nope"), D)


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, D, generator=g)
    mask = torch.rand(n, 4, generator=g) > 0.4
    mask[0] = False  # one location without any view
    mask[1] = True
    x[~mask] = float("nan")  # whatever the store holds in a missing slot must not leak
    return x, mask


@pytest.mark.parametrize("name", list(MODULES))
def test_missing_views_give_finite_outputs_and_gradients(name):
    module = MODULES[name]
    x, mask = _batch(12, seed=1)
    module.eval()
    with torch.no_grad():
        assert torch.isfinite(module(x, mask)).all()
    module.train()
    out = module(x, mask)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    module.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", list(MODULES))
def test_a_sample_does_not_depend_on_its_batch(name):
    module = MODULES[name].eval()
    x, mask = _batch(9, seed=2)
    with torch.no_grad():
        alone = module(x[1:2], mask[1:2])
        for rows in ([1, 0, 2, 3], [4, 5, 1], list(range(9))):
            together = module(x[rows], mask[rows])
            assert torch.allclose(together[rows.index(1)], alone[0], atol=1e-5), rows
        # A missing view's slot contents (NaN, zeros, anything) never matter.
        other = x.clone()
        other[~mask] = 123.0
        assert torch.allclose(module(other, mask), module(x, mask), atol=1e-6)


def test_seed_preset_builds_the_seed_architecture():
    d, classes = 1024, 33
    plan = recipe("seed", ["streetclip", "convnextv2-large"])
    clip, convnext = plan.members
    scout = Scout(clip.config, d, classes)
    fusion = scout.fusion
    assert isinstance(fusion, TransformerFusion) and fusion.pooling == "concat"
    assert isinstance(fusion.project, nn.Identity) and isinstance(fusion.input_norm, nn.Identity)
    assert fusion.directions is None
    assert len(fusion.encoder.layers) == 2
    for layer in fusion.encoder.layers:
        assert layer.self_attn.embed_dim == d and layer.self_attn.num_heads == 8
        assert layer.dropout.p == 0.1 and not layer.norm_first
    assert fusion.out_dim == 4 * d
    kinds = [type(m) for m in scout.head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.SiLU, nn.Dropout, nn.Linear]
    assert (scout.head[0].in_features, scout.head[0].out_features) == (4 * d, 1024)
    assert scout.head[1].num_features == 1024 and scout.head[3].p == 0.3
    assert (scout.head[4].in_features, scout.head[4].out_features) == (1024, classes)
    assert clip.config.label_smoothing == 0.0
    # the ConvNeXt branch: no fusion transformer, the four views concatenated, Linear(2048), BN, GELU, Dropout(0.4)
    other = Scout(convnext.config, 1536, classes)
    assert isinstance(other.fusion, ConcatFusion) and other.fusion.out_dim == 4 * 1536
    assert [type(m) for m in other.head] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Dropout, nn.Linear]
    assert other.head[0].out_features == 2048 and other.head[3].p == 0.4 and convnext.config.label_smoothing == 0.1
    # roles by position, not by name: the first backbone takes the StreetCLIP branch and weight 0.6
    assert [m.backbones for m in plan.members] == [("streetclip",), ("convnextv2-large",)]
    assert plan.ensemble.weights == "fixed" and plan.ensemble.fixed_weights == (0.6, 0.4)
    swapped = recipe("seed", ["convnextv2-large", "streetclip"])
    assert swapped.members[0].backbones == ("convnextv2-large",) and swapped.members[0].config.fusion.kind == "transformer"
    sniper = Sniper(plan.regressor, 2560, classes)
    assert tuple(sniper.cell_embedding.weight.shape) == (classes, 64)
    assert sniper.body[0].in_features == 2560 + 64  # the cell embedding scaled by confidence, nothing else


def test_default_recipe_has_a_classifier_per_backbone_and_a_probe_on_all_of_them():
    plan = recipe("default", ["a", "b", "c"])
    assert [m.name for m in plan.members] == ["classifier-a", "classifier-b", "classifier-c", "probe-a+b+c"]
    scout = Scout(plan.members[0].config, 1536, 300)
    assert isinstance(scout.fusion, AttentionFusion) and scout.head[0].out_features == 512
    assert plan.ensemble.weights == "fit" and plan.folds == 5


def test_sniper_starts_at_the_centroid():
    sniper = Sniper(recipe("default", ["a"]).regressor, 8, 5).eval()
    offset = sniper(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), torch.rand(4))
    assert offset.abs().max() < 0.05  # degrees


def test_sniper_candidates_share_the_descriptor_and_match_the_plain_layer():
    """k candidate cells per location give what the first layer applied to [descriptor, cell part] gives."""
    torch.manual_seed(0)
    sniper = Sniper(recipe("default", ["a"]).regressor, 8, 5).eval()
    nn.init.normal_(sniper.out.weight)  # away from the near-zero start, so a wrong part would show
    descriptor, cells, confidence = torch.randn(3, 8), torch.randint(0, 5, (3, 4)), torch.rand(3, 4)
    together = sniper(descriptor, cells, confidence)
    assert together.shape == (3, 4, 2)
    one_by_one = sniper(descriptor.repeat_interleave(4, dim=0), cells.reshape(-1), confidence.reshape(-1))
    torch.testing.assert_close(together.reshape(-1, 2), one_by_one, rtol=1e-5, atol=1e-4)
    first = sniper.body[0]
    x = torch.cat([sniper.standardize(descriptor), sniper.cell_embedding(cells[:, 0]) * confidence[:, :1],
                   confidence[:, :1]], dim=1)
    reference = sniper.out(sniper.body[1:](first(x))) * sniper.offset_scale_deg
    torch.testing.assert_close(together[:, 0], reference, rtol=1e-5, atol=1e-4)


def test_width_must_divide_into_heads():
    with pytest.raises(ValueError, match="divisible"):
        TransformerFusion(FusionConfig(width=10, heads=4), D)


def test_classifier_config_rejects_unknown_norm():
    with pytest.raises(ValueError, match="available"):
        Scout(ClassifierConfig(norm="group"), D, 3)


@pytest.mark.parametrize("kind", ["mean", "attention"])
def test_standardising_after_pooling_equals_pooling_standardised_views(kind):
    """Pooling fusions standardise the pooled (B, D) vector, not every view: the same numbers, a quarter
    of the work. The attention score's constant part cancels in the softmax."""
    from geoscout.heads.inputs import Standardize

    torch.manual_seed(0)
    fusion = build_fusion(FusionConfig(kind=kind, width=8, input_norm=False), D)
    if kind == "attention":
        nn.init.normal_(fusion.score.weight)
    standardize = Standardize(D)
    standardize.set_statistics(torch.randn(D).numpy() * 3, torch.rand(D).numpy() + 0.5)
    x, mask = _batch(10, seed=3)
    with torch.no_grad():
        folded = fusion(x, mask, standardize)
        plain = fusion(standardize(x.nan_to_num(0.0)), mask)
    assert torch.allclose(folded, plain, atol=1e-5)
