"""A run's folder: every output file name, atomic writes, the resume state, the metrics.json
and index.json schemas, locking and overwriting, and reading runs back.

    names          every file name (the reference's for the images and the log)
    folder         RunFolder: status, lock, --overwrite, log.txt, images, metrics, the state
    state_file     the resume state file (tensors only, validated in full when read)
    fingerprint    what must not change between a run and its resumption
    metrics        metrics.json / index.json, and reading runs back (figures, benchmarks)
"""
from ldm.run_folder.folder import RunFolder, RunFolderError
from ldm.run_folder.metrics import collect_runs, find_run_folders, load_run, read_metrics
from ldm.run_folder.state_file import RunStateError, load_state, peek_run, save_state

__all__ = ["RunFolder", "RunFolderError", "RunStateError", "collect_runs", "find_run_folders",
           "load_run", "load_state", "peek_run", "read_metrics", "save_state"]
