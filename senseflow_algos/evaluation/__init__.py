"""Evaluation like the paper's Table 1: generate with fixed seeds (resumable), then FID-T and Patch FID-T (student vs
teacher), CLIP score, HPSv2, PickScore and ImageReward. See :func:`~senseflow_algos.evaluation.runner.evaluate` and
``python eval.py --help``."""

from senseflow_algos.evaluation.features import (
    FeatureExtractor,
    MetricUnavailable,
    RandomConvFeatures,
    build_feature_extractor,
)
from senseflow_algos.evaluation.fid import feature_statistics, fid_from_features, frechet_distance, random_patches
from senseflow_algos.evaluation.generation import EvalError, generate_images, load_images, open_source
from senseflow_algos.evaluation.prompts import load_prompts
from senseflow_algos.evaluation.runner import evaluate, main
from senseflow_algos.evaluation.scores import CLIPScorer, HPSv2Scorer, ImageRewardScorer, PickScorer
from senseflow_algos.evaluation.table import format_table, write_results

__all__ = [
    'evaluate', 'main', 'EvalError', 'MetricUnavailable', 'FeatureExtractor', 'RandomConvFeatures',
    'build_feature_extractor', 'feature_statistics', 'frechet_distance', 'fid_from_features', 'random_patches',
    'generate_images', 'load_images', 'open_source', 'load_prompts', 'CLIPScorer', 'PickScorer', 'HPSv2Scorer',
    'ImageRewardScorer', 'format_table', 'write_results'
]
