"""Selecting capture points: patterns, exclusions, layer ranges, positions, and errors."""

import pytest
from helpers import tiny_config

from gemmalens.errors import SelectionError
from gemmalens.engine.selection import catalogue, parse_layers, select

CONFIG = tiny_config()


def test_patterns_select_model_points():
    selection = select(CONFIG, ["model.layers.*.resid_out"])
    assert selection.model_names == {f"model.layers.{i}.resid_out" for i in range(4)}


def test_exclude_and_layer_range_narrow_the_selection():
    selection = select(CONFIG, ["model.layers.*.mlp.*"], exclude=["*.mlp.hidden"], layers="1-2")
    assert selection.model_names == {f"model.layers.{i}.mlp.{p}" for i in (1, 2)
                                     for p in ("gate_proj_out", "up_proj_out", "act_out", "down_proj_out")}


def test_sampling_points_resolve_per_step():
    selection = select(CONFIG, ["generate.step_*.sample.token", "generate.step_0.sample.softmax_probs"])
    assert selection.names_for_step(0) == {"generate.step_0.sample.token", "generate.step_0.sample.softmax_probs"}
    assert selection.names_for_step(3) == {"generate.step_3.sample.token"}


def test_positions_prompt_and_generated_split_the_steps():
    prompt_only = select(CONFIG, ["model.embed_scaled", "generate.*.sample.token"], positions="prompt")
    assert prompt_only.names_for_step(0) == {"model.embed_scaled", "generate.step_0.sample.token"}
    assert prompt_only.names_for_step(1) == set()
    generated = select(CONFIG, ["model.embed_scaled", "generate.*.sample.token"], positions="generated")
    assert generated.names_for_step(0) == {"generate.step_0.sample.token"}
    assert generated.names_for_step(2) == {"model.embed_scaled", "generate.step_2.sample.token"}


def test_a_pattern_matching_nothing_lists_near_names():
    with pytest.raises(SelectionError, match=r"'model\.layers\.0\.mlp\.gate_out' matches no capture point; nearest names: .*gate_proj_out"):
        select(CONFIG, ["model.layers.0.mlp.gate_out"])


def test_bad_layers_and_positions_are_errors():
    with pytest.raises(SelectionError, match="outside 0-3"):
        parse_layers("2-7", 4)
    with pytest.raises(SelectionError, match="expected integers"):
        parse_layers("a-b", 4)
    with pytest.raises(SelectionError, match="positions 'middle'"):
        select(CONFIG, ["*"], positions="middle")


def test_catalogue_has_every_documented_point_with_shape_and_meaning():
    names = {name for name, shape, meaning in catalogue(CONFIG) if shape and meaning}
    for point in ("model.embed_tokens_out", "model.layers.0.self_attn.queries_reshaped", "model.layers.3.mlp.gate_proj_out",
                  "model.layers.2.self_attn.attn_scores", "model.norm_out", "generate.step_{k}.sample.softmax_probs"):
        assert point in names
