"""Data: the manifest of every subset, verified official files, the HDF5 store and tasks.

``manifest`` (facts) <- ``fetch`` (verified npz files) <- ``store`` (HDF5) <- ``tasks`` (torch datasets).
"""
from .manifest import Manifest, SubsetInfo, load_manifest
from .store import Store
from .tasks import MedMNISTTask, TaskDescription, find_task, list_tasks

__all__ = ["Manifest", "MedMNISTTask", "Store", "SubsetInfo", "TaskDescription", "find_task", "list_tasks",
           "load_manifest"]
