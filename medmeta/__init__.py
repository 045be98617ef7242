"""medmeta: cross-domain few-shot learning on MedMNIST.

Data flows one way: manifest -> store -> tasks -> episodes -> trainers -> results.
``import medmeta`` gives the pieces other research code needs: the manifest, the store,
tasks as torch datasets and the episodic samplers.
"""
__version__ = "0.1.0"

from .episodes import (Episode, EpisodeSampler, EpisodeSet, MultiTaskEpisodeSampler, load_episode_set,  # noqa: E402
                       save_episode_set)
from .manifest import load_manifest  # noqa: E402
from .store import Store  # noqa: E402
from .tasks import MedMNISTTask, TaskDescription, find_task, list_tasks  # noqa: E402

__all__ = ["Episode", "EpisodeSampler", "EpisodeSet", "MedMNISTTask", "MultiTaskEpisodeSampler", "Store",
           "TaskDescription", "find_task", "list_tasks", "load_episode_set", "load_manifest", "save_episode_set"]
