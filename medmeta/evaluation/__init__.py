"""Evaluation: the experiment config, the leave-one-out protocol, summary statistics and results.

``config`` (typed experiment settings, method names) <- ``protocol`` <- ``results``.
"""
from .config import ExperimentConfig, build_method, build_methods, load_experiment_config
from .protocol import Protocol, Target, evaluate_method, run_protocol

__all__ = ["ExperimentConfig", "Protocol", "Target", "build_method", "build_methods", "evaluate_method",
           "load_experiment_config", "run_protocol"]
