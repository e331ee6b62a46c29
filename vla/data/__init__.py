"""Data pipeline: LeRobot datasets, normalization statistics, pre/post-processing.

lerobot and pyarrow are imported inside the functions that need them, so importing this
package is cheap.
"""
from vla.data.dataset import DatasetSpec, dataset_spec, load_metadata, make_dataset, resolve_camera_map
from vla.data.normalize import MODES, Normalizer
from vla.data.processor import Preprocessor
from vla.data.stats import compute_stats, load_stats, save_stats, stats_from_jsonable, stats_to_jsonable
from vla.data.synthetic import make_synthetic_dataset

__all__ = [
    "DatasetSpec", "dataset_spec", "load_metadata", "make_dataset", "resolve_camera_map",
    "MODES", "Normalizer", "Preprocessor",
    "compute_stats", "load_stats", "save_stats", "stats_from_jsonable", "stats_to_jsonable",
    "make_synthetic_dataset",
]
