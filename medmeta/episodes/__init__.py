"""Few-shot episodes: the ``Episode`` type, samplers that yield episode indices, loading and fixed sets.

``episode`` (the types) <- ``loading`` (indices to tensors) <- ``sets`` (stored evaluation
sets) <- ``sampling`` (the samplers).
"""
from .episode import Episode, EpisodeSpec
from .loading import EpisodeDataset, EpisodeSource, collate_episode, materialise
from .sampling import BLOCK, EpisodeSampler, MultiTaskEpisodeSampler, task_probabilities
from .sets import EpisodeSet, episode_digest, load_episode_set, save_episode_set

__all__ = ["BLOCK", "Episode", "EpisodeDataset", "EpisodeSampler", "EpisodeSet", "EpisodeSource", "EpisodeSpec",
           "MultiTaskEpisodeSampler", "collate_episode", "episode_digest", "load_episode_set", "materialise", "save_episode_set",
           "task_probabilities"]
