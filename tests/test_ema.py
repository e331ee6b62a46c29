"""The weight average of `--ema_decay`: its arithmetic, the swap, and what a checkpoint holds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vla.ema import EMA


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m[0].weight.requires_grad_(False)  # frozen parameters are not averaged
    return m


def test_update_is_the_warmed_up_moving_average() -> None:
    m = _model()
    ema = EMA(m, decay=0.9)
    assert "0.weight" not in ema.shadow and "1.weight" in ema.shadow
    expected = m[1].weight.detach().clone()
    for k in range(30):
        with torch.no_grad():
            m[1].weight.add_(1.0)
        d = min(0.9, (1 + k) / (10 + k))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(m)
        expected = d * expected + (1 - d) * m[1].weight.detach()
    assert torch.allclose(ema.shadow["1.weight"], expected, atol=1e-5)
    assert not torch.allclose(ema.shadow["1.weight"], m[1].weight)  # the average lags the weights


def test_swapped_puts_the_average_in_and_restores_the_weights() -> None:
    m = _model()
    ema = EMA(m, decay=0.5, warmup=False)
    raw = m[1].weight.detach().clone()
    with torch.no_grad():
        m[1].weight.add_(2.0)
    ema.update(m)  # shadow = raw + 1
    with ema.swapped(m):
        assert torch.allclose(m[1].weight, raw + 1.0)
    assert torch.allclose(m[1].weight, raw + 2.0)


def test_bad_decay_and_mismatched_state_are_errors() -> None:
    with pytest.raises(ValueError, match="decay"):
        EMA(_model(), decay=1.0)
    ema = EMA(_model(), decay=0.9)
    with pytest.raises(KeyError, match="different parameters"):
        ema.load_state_dict({"decay": 0.9, "warmup": True, "num_updates": 0, "shadow": {"x": torch.zeros(1)}})


def test_checkpoint_holds_the_average(tmp_path: Path) -> None:
    """`vla train --ema_decay`: the saved policy is the EMA, training_state.pt keeps the raw weights."""
    from vla.config import TrainConfig, parse_config
    from vla.data.synthetic import make_synthetic_dataset
    from vla.policy import VLAPolicy
    from vla.presets import get_preset
    from vla.train import train

    data = make_synthetic_dataset(tmp_path / "syn", num_episodes=2, episode_len=10)
    cfg = parse_config(TrainConfig, get_preset("debug"), [
        f"--output_dir={tmp_path / 'run'}", f"--dataset.root={data}", "--dataset.synthetic=false",
        "--batch_size=4", "--steps=3", "--save_every=0", "--warmup_steps=1", "--ema_decay=0.99"])
    ckpt = train(cfg)
    state = torch.load(ckpt.parent / "training_state.pt", weights_only=False)
    saved = VLAPolicy.from_pretrained(ckpt).state_dict()
    name = "head.action_out.weight"
    assert torch.allclose(saved[name], state["ema"]["shadow"][name])
    assert not torch.allclose(saved[name], state["raw_weights"][name])
