"""Config parsing: presets + CLI overrides, choice switching, and unknown names with suggestions."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from action_tokenizers.base import TokenizerConfig
from robots.base import RobotConfig
from vla.config import PolicyConfig, TrainConfig, from_dict, parse_config, to_dict
from vla.presets import PRESETS, get_preset
from vla.registry import UnknownNameError


def test_preset_then_override() -> None:
    cfg = parse_config(TrainConfig, get_preset("debug"), ["--steps=7", "--head.num_steps=3", "--policy.chunk_size=6"])
    assert cfg.steps == 7 and cfg.policy.head.num_steps == 3 and cfg.policy.chunk_size == 6
    assert cfg.policy.head.width == get_preset("debug").policy.head.width  # untouched fields keep the preset


def test_switching_a_choice_resets_to_the_new_types_defaults() -> None:
    from vla.backbones.timm_lm import TimmLMConfig

    cfg = parse_config(TrainConfig, get_preset("debug"), ["--backbone.type=timm_lm", "--backbone.width=32"])
    assert isinstance(cfg.policy.backbone, TimmLMConfig) and cfg.policy.backbone.width == 32


@pytest.mark.parametrize(
    "args,kind,suggestion",
    [
        (["--head.type=flow_match"], "head", "flow_matching"),
        (["--backbone.type=timm_llm"], "backbone", "timm_lm"),
    ],
)
def test_unknown_choice_lists_known_and_suggests(args, kind, suggestion) -> None:
    with pytest.raises(UnknownNameError) as e:
        parse_config(TrainConfig, get_preset("debug"), args)
    msg = str(e.value)
    assert f"unknown {kind}" in msg and suggestion in msg and "Did you mean" in msg


def test_unknown_preset() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'debug'"):
        get_preset("debugg")


def test_cli_reports_unknown_command(capsys) -> None:
    from vla.cli import main

    assert main(["trian"]) == 2
    assert "Did you mean 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dicts(name: str) -> None:
    cfg = get_preset(name)
    again = from_dict(TrainConfig, to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    assert isinstance(from_dict(PolicyConfig, to_dict(cfg.policy)), PolicyConfig)



@dataclass
class _PluginCfg:  # module level: draccus resolves the (string) annotations in module globals
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig.get_choice_class("fast")())
    robot: RobotConfig = field(default_factory=lambda: RobotConfig.get_choice_class("mock")())


def test_plugin_choice_fields_are_checked_too() -> None:
    """Registries outside vla (tokenizers, robots) get the same unknown-name message."""
    cfg = parse_config(_PluginCfg, _PluginCfg(), ["--tokenizer.type=uniform"])
    assert cfg.tokenizer.type == "uniform"
    with pytest.raises(UnknownNameError, match="Did you mean 'fast'"):
        parse_config(_PluginCfg, _PluginCfg(), ["--tokenizer.type=fsat"])
    with pytest.raises(UnknownNameError, match="Did you mean 'mock'"):
        parse_config(_PluginCfg, _PluginCfg(), ["--robot.type=mokc"])
