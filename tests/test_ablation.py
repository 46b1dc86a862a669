"""`geoscout ablate`: a chosen subset of recipes, the multi-layer variant where the store has --layers."""

import json

import pytest

from geoscout.ablation import RECIPE_NAMES, recipes, run_ablation
from geoscout.errors import ConfigError
from geoscout.extract.runner import extract

BACKBONE = "random:timm:test_convnext"
PROBE_ALONE = "default - classifiers (the probe alone)"
MULTI_LAYER = "default + multi-layer features"


def test_recipes_keep_the_named_ones_in_table_order():
    chosen = recipes(["a", "b"], only=[MULTI_LAYER, "seed"])
    assert [r.name for r in chosen] == ["seed", MULTI_LAYER]
    assert [r.name for r in recipes(["a", "b"])] == list(RECIPE_NAMES)
    with pytest.raises(ConfigError, match="unknown ablation recipe.*'nope'"):
        recipes(["a"], only=["default", "nope"])


@pytest.mark.parametrize("layers", [0, 2])
def test_the_multi_layer_variant_runs_only_on_a_store_with_layers(synth_master, tmp_path, layers):
    store = tmp_path / "store"
    extract(synth_master, store, backbones=[BACKBONE], device="cpu", workers=0, layers=layers, progress=False)
    said = []
    result = run_ablation(store, work_dir=tmp_path / "work", seeds=1, device="cpu", only=[PROBE_ALONE, MULTI_LAYER],
                          log=said.append)
    names = [r["name"] for r in result["recipes"]]
    assert names == ([PROBE_ALONE, MULTI_LAYER] if layers else [PROBE_ALONE])
    assert any("left out" in s and "--layers" in s for s in said) == (not layers)
    written = json.loads((tmp_path / "work" / "eval" / "ablation.json").read_text())
    assert [r["name"] for r in written["recipes"]] == names
    for row in written["recipes"]:  # synthetic data: the test split is scored beside validation
        assert 0 < row["test"]["score"]["mean"] <= 1 and row["test"]["score"]["std"] == 0
