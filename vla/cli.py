"""The ``vla`` command line.

    vla train [--preset=NAME] [--field.sub=value ...]   train a policy (draccus flags over a preset)
    vla presets                                          list presets
    vla data metaworld ...                               generate MetaWorld demonstrations
    vla eval metaworld --policy PATH ...                 closed-loop MetaWorld evaluation
    vla tokenizer fit --tokenizer.type=fast --dataset=ROOT --out=DIR   fit an action tokenizer
    vla demo                                             data -> train -> eval -> report (README)
    vla pretrain ...                                     multi-process DeepSpeed training (torchrun/deepspeed)
    vla post-train {world-model,preferences,dpo,cfn,value,dagger} post-training and selector fitting
    vla serve --policy PATH [--adapter NAME=PATH ...]    websocket policy server
    vla deploy --robot.type=NAME --server ws://...       robot control loop
"""
from __future__ import annotations

import logging
import sys

from vla.registry import UnknownNameError, lookup

USAGE = __doc__


def _split_preset(argv: list[str]) -> tuple[str | None, list[str]]:
    preset, rest = None, []
    it = iter(argv)
    for a in it:
        if a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        elif a == "--preset":
            preset = next(it, None)
        else:
            rest.append(a)
    return preset, rest


def cmd_train(argv: list[str]) -> int:
    from vla.config import TrainConfig, parse_config
    from vla.plugins import load_plugins
    from vla.presets import get_preset
    from vla.train import train

    load_plugins()
    preset, rest = _split_preset(argv)
    base = get_preset(preset) if preset else TrainConfig()
    cfg = parse_config(TrainConfig, base, rest)
    path = train(cfg)
    print(f"checkpoint: {path}")
    return 0


def cmd_presets(argv: list[str]) -> int:
    from vla.presets import PRESETS

    for name, fn in PRESETS.items():
        print(f"{name:18s} {(fn.__doc__ or '').strip()}")
    return 0


def _sub(table: dict[str, str], kind: str):
    def run(argv: list[str]) -> int:
        import importlib

        if not argv or argv[0].startswith("-"):
            print(f"usage: vla {kind} {{{','.join(table)}}} ...", file=sys.stderr)
            return 2
        mod = importlib.import_module(lookup(f"{kind} target", table, argv[0]))
        return int(mod.main(argv[1:]) or 0)

    return run


COMMANDS = {
    "train": cmd_train,
    "presets": cmd_presets,
    "data": _sub({"metaworld": "benchmarks.metaworld.generate"}, "data"),
    "eval": _sub({"metaworld": "benchmarks.metaworld.evaluate"}, "eval"),
    "tokenizer": lambda argv: int(__import__("action_tokenizers.fit", fromlist=["main"]).main(argv) or 0),
    "pretrain": lambda argv: int(__import__("vla.train_deepspeed", fromlist=["main"]).main(argv) or 0),
    "post-train": _sub({"world-model": "post_training.world_model_train", "preferences": "post_training.preferences",
                        "dpo": "post_training.dpo", "cfn": "post_training.cfn_train",
                        "value": "post_training.value_train", "dagger": "post_training.dagger_train"}, "post-train"),
    "serve": lambda argv: int(__import__("robots.server", fromlist=["main"]).main(argv) or 0),
    "deploy": lambda argv: int(__import__("robots.deploy", fromlist=["main"]).main(argv) or 0),
    "demo": lambda argv: int(__import__("benchmarks.demo", fromlist=["main"]).main(argv) or 0),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        fn = lookup("command", COMMANDS, argv[0])
        return fn(argv[1:])
    except UnknownNameError as e:
        print(f"vla: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
