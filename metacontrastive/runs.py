"""Run folders: where a run keeps its logs and checkpoints, and how a later command finds one.

A run lives in ``<save_dir>/<name>/<version>/`` (the TensorBoard logger's folder: events, ``config.yaml``,
``hparams.yaml``) with its checkpoints in ``checkpoints/``. ``resolve_run`` turns the command line's
``--run`` and ``--ckpt_path last`` into that folder before anything is built:

- ``--run NAME`` names the version folder (``logs/dcmcl/NAME``); ``--run logs/dcmcl/version_3`` names a
  folder by its path. A new ``fit`` into a folder that already holds checkpoints is refused.
- ``--ckpt_path last`` resumes the named run, or else the newest run under ``<save_dir>/<name>`` with a
  ``checkpoints/last.ckpt``, in its own folder: TensorBoard curves go on in place.
- ``validate`` and ``test`` need a checkpoint (``--ckpt_path PATH`` or ``last``); ``--ckpt_path untrained``
  scores the freshly initialised model on purpose.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["UNTRAINED", "newest_run", "resolve_run", "run_folder"]

UNTRAINED = "untrained"


def run_folder(ckpt: str | Path) -> Path:
    """The run folder of a checkpoint: ``<run>/checkpoints/x.ckpt`` -> ``<run>``."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def newest_run(folder: str | Path) -> Path | None:
    """The run folder under ``folder`` whose ``checkpoints/last.ckpt`` was written last, or None."""
    candidates = sorted(Path(folder).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return run_folder(candidates[-1]) if candidates else None


def _logger_args(config) -> object | None:
    """The TensorBoard logger's init_args in a parsed config, or None for another logger or none."""
    logger = config.trainer.logger
    if getattr(logger, "class_path", "").endswith("TensorBoardLogger"):
        return logger.init_args
    return None


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise SystemExit(f"cannot write logs to {folder}: {err.strerror or err}; choose a writable folder with "
                         f"--trainer.logger.init_args.save_dir=DIR") from None


def resolve_run(config, subcommand: str) -> None:
    """Apply ``--run`` and ``--ckpt_path last`` / ``untrained`` to a parsed LightningCLI config, in place
    (see the module docstring). Exits with a one-line message on a run that cannot be."""
    ckpt, run, logger = config.ckpt_path, config.get("run"), _logger_args(config)
    if subcommand in ("validate", "test") and ckpt is None:
        raise SystemExit(f"{subcommand} scores a trained model: pass --ckpt_path PATH, --ckpt_path last (the newest run), "
                         f"or --ckpt_path {UNTRAINED} to score a freshly initialised one on purpose")
    if ckpt == UNTRAINED:
        config.ckpt_path = None
        return
    if logger is None:
        if run is not None or ckpt == "last":
            raise SystemExit("--run and --ckpt_path last need the TensorBoard logger of conf/default.yaml")
        return
    runs = Path(logger.save_dir) / (logger.name or "")
    folder = None
    if run is not None:
        path = Path(run)
        if len(path.parts) > 1:  # a path: <save_dir>/<name>/<version>
            logger.save_dir, logger.name, folder = str(path.parent.parent), path.parent.name, path
        else:
            folder = runs / run
        logger.version = folder.name
    if ckpt == "last":
        folder = folder or newest_run(runs)
        last = folder / "checkpoints" / "last.ckpt" if folder is not None else None
        if last is None or not last.exists():
            where = folder if folder is not None else runs
            raise SystemExit(f"--ckpt_path last: no checkpoints/last.ckpt under {where}; start the run first "
                             f"(`make train`), or name a checkpoint with --ckpt_path PATH")
        config.ckpt_path, logger.version = str(last), folder.name
    elif subcommand == "fit" and folder is not None and (folder / "checkpoints").exists():
        raise SystemExit(f"run folder {folder} already holds checkpoints: resume it with --ckpt_path last "
                         f"(`make train RESUME=1 RUN={folder.name}`), or name another --run")
    if subcommand == "fit":
        _check_writable(Path(logger.save_dir))
