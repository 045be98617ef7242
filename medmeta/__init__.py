"""medmeta: cross-domain few-shot learning on MedMNIST.

Data flows one way through the sub-packages: ``data`` (manifest -> verified files -> HDF5 store
-> tasks) -> ``episodes`` (samplers, loading, fixed sets) -> ``learning`` (backbones,
fine-tuning, mm-PT, MAML) -> ``methods`` (initialisation + adaptation rule) -> ``evaluation``
(config, the leave-one-out protocol, results). ``tasktype``, ``settings``, ``errors`` and
``files`` are the shared vocabulary underneath.

``import medmeta`` gives what other research code needs most.
"""
from ._version import __version__  # noqa: E402,F401
from .data import Manifest, MedMNISTTask, Store, TaskDescription, find_task, list_tasks, load_manifest  # noqa: E402
from .episodes import (Episode, EpisodeSampler, EpisodeSet, EpisodeSpec, MultiTaskEpisodeSampler,  # noqa: E402
                       load_episode_set, save_episode_set)
from .errors import MedmetaError  # noqa: E402
from .evaluation import ExperimentConfig, load_experiment_config, run_protocol  # noqa: E402
from .methods import AdaptationRule, Initialisation, Method  # noqa: E402
from .tasktype import TaskType  # noqa: E402

__all__ = ["__version__", "AdaptationRule", "Episode", "EpisodeSampler", "EpisodeSet", "EpisodeSpec", "ExperimentConfig",
           "Initialisation", "Manifest", "MedMNISTTask", "MedmetaError", "Method", "MultiTaskEpisodeSampler", "Store",
           "TaskDescription", "TaskType", "find_task", "list_tasks", "load_episode_set", "load_experiment_config",
           "load_manifest", "run_protocol", "save_episode_set"]
