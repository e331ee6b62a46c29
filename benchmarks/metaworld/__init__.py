"""MetaWorld benchmark: scripted demonstrations into LeRobot datasets, closed-loop evaluation, reports.

    python -m benchmarks.metaworld.generate --tasks mt10 --episodes 50 --out data/mt10
    python -m benchmarks.metaworld.evaluate --policy PATH --tasks mt10 --episodes 10 --out outputs/eval

Nothing heavy is imported here: metaworld, mujoco and torch load inside the functions that need them.
"""
