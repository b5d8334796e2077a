"""TOML configuration: defaults, merging, dotted overrides, type checks."""

from __future__ import annotations

import pytest

from flowplug import config
from flowplug.errors import ConfigError

DEFAULT = """
seed = 0
lattice = [8, 8]
[action]
name = "wilson"
beta = 2.0
[flow]
layers = 4
[flow.options]
hidden = 8
"""


def test_override_parses_toml_values_and_bare_words():
    assert config.parse_override("a.b=3") == {"a": {"b": 3}}
    assert config.parse_override("a=[1, 2]") == {"a": [1, 2]}
    assert config.parse_override("name=omelyan") == {"name": "omelyan"}
    assert config.parse_override('name="x y"') == {"name": "x y"}
    assert config.parse_override("flag=true") == {"flag": True}
    with pytest.raises(ConfigError, match="empty key"):
        config.parse_override("a..b=1")


def test_int_is_accepted_for_float_and_converted():
    cfg = config.build_config(DEFAULT, overrides=["action.beta=4"])
    assert cfg["action"]["beta"] == 4.0 and isinstance(cfg["action"]["beta"], float)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="'seed' must be of type integer, found boolean True"):
        config.build_config(DEFAULT, overrides=["seed=true"])


def test_table_cannot_be_replaced_by_scalar():
    with pytest.raises(ConfigError, match="'action' must be of type table"):
        config.build_config(DEFAULT, overrides=["action=3"])


def test_open_tables_accept_plugin_options():
    cfg = config.build_config(DEFAULT, overrides=["flow.options.kernel_size=3"], open_tables=["flow.options"])
    assert cfg["flow"]["options"] == {"hidden": 8, "kernel_size": 3}
    with pytest.raises(ConfigError, match="unknown configuration key 'flow.options.kernel_size'"):
        config.build_config(DEFAULT, overrides=["flow.options.kernel_size=3"])


def test_get_and_dumps_round_trip():
    cfg = config.build_config(DEFAULT, overrides=['action.name="su3"'])
    assert config.get(cfg, "action.name") == "su3"
    with pytest.raises(ConfigError, match="'action.gamma' is missing"):
        config.get(cfg, "action.gamma")
    assert config.parse_toml(config.dumps(cfg)) == cfg


def test_list_elements_are_type_checked():
    with pytest.raises(ConfigError, match="'lattice' must be of type list"):
        config.build_config(DEFAULT, overrides=['lattice=["a", true]'])
    assert config.build_config(DEFAULT, overrides=["lattice=[4, 6, 8]"])["lattice"] == [4, 6, 8]


def test_dumps_quotes_unusual_keys():
    cfg = config.build_config(DEFAULT, overrides=['flow.options."odd key.x"=1'], open_tables=["flow.options"])
    assert config.parse_toml(config.dumps(cfg)) == cfg
