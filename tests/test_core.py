"""Registry, configs (YAML round trip, errors that name the key), MAC counter vs a hand count, atomic writes."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field
from torch import nn

from prunekit._io import atomic_write
from prunekit.config import Config
from prunekit.errors import ConfigError
from prunekit.measure import count_macs, count_params
from prunekit.registry import Registry


def test_registry_unknown_name_lists_valid_names_and_suggests():
    r = Registry("widget")
    r.register("alpha")(object())
    r.register("beta")(object())
    with pytest.raises(ConfigError, match=r"unknown widget 'alpah'; did you mean 'alpha'\?.*alpha, beta"):
        r.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        r.register("alpha")(object())
    assert r.names() == ["alpha", "beta"] and "beta" in r


class _Cfg(Config):
    ratio: float = Field(0.5, gt=0, lt=1)
    name: str = "x"
    from_dir: str | None = Field(None, alias="from")


def test_config_yaml_round_trip_and_alias():
    c = _Cfg.build({"ratio": 0.3, "from": "runs/a"})
    assert c.from_dir == "runs/a"
    d = c.to_dict()
    assert d == {"ratio": 0.3, "name": "x", "from": "runs/a"}
    import yaml

    assert _Cfg.build(yaml.safe_load(c.to_yaml())) == c


def test_config_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'ratoi'; did you mean 'ratio'\?"):
        _Cfg.build({"ratoi": 0.3}, source="recipe.yaml")


def test_config_out_of_range_names_flag_and_value():
    with pytest.raises(ConfigError, match=r"--ratio \(ratio\) = 1.5 is invalid"):
        _Cfg.build({"ratio": 1.5}, source="command line")


def test_macs_match_hand_count_for_conv_and_linear():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1, stride=2),
                      nn.Flatten(), nn.Linear(4 * 5 * 5, 7))
    x = torch.randn(2, 3, 10, 10)
    hand = 8 * 10 * 10 * 3 * 3 * 3 + 4 * 5 * 5 * 8 * 1 * 1 + 7 * 100
    assert count_macs(m, x) == hand  # per sample, batch of 2
    assert count_params(m) == 8 * 27 + (4 * 8 + 4) + (700 + 7)


def test_count_params_counts_tied_weights_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert count_params(nn.ModuleList([emb, head])) == 40


def test_atomic_write_leaves_old_file_when_writer_dies(tmp_path):
    p = tmp_path / "f.bin"
    p.write_text("old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]  # no temp file left behind
