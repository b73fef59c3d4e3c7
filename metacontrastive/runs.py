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
- The checkpoint a command is given is checked once, before the model or the data is built
  (``check_checkpoint``): a missing, truncated or corrupt file, or one that is not this project's, is one
  line that names it and the checkpoints beside it. ``check_ckpt_path`` checks a ``--ckpt_path FILE`` as
  soon as the command line is parsed (LightningCLI reads the file's hyperparameters next), ``resolve_run``
  the ``last.ckpt`` it resolves ``--ckpt_path last`` to.

Every input the user must fix raises ``metacontrastive.errors.BadInput``.
"""
from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import torch

from metacontrastive.errors import BadInput

__all__ = ["UNTRAINED", "check_checkpoint", "check_ckpt_path", "newest_run", "resolve_run", "run_folder"]

UNTRAINED = "untrained"
# What a Lightning checkpoint of this project's module holds (the module's weights and its __init__ arguments).
_CHECKPOINT_KEYS = ("state_dict", "hyper_parameters")


def run_folder(ckpt: str | Path) -> Path:
    """The run folder of a checkpoint: ``<run>/checkpoints/x.ckpt`` -> ``<run>``."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def newest_run(folder: str | Path) -> Path | None:
    """The run folder under ``folder`` whose ``checkpoints/last.ckpt`` was written last, or None."""
    candidates = sorted(Path(folder).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return run_folder(candidates[-1]) if candidates else None


def _beside(path: Path) -> str:
    """What to pass instead of ``path``: the other checkpoints in its folder, newest first, or how to make one."""
    others = sorted((p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve()),
                    key=lambda p: p.stat().st_mtime, reverse=True) if path.parent.is_dir() else []
    if not others:
        return "train one with `make train` (a run keeps its checkpoints in logs/<name>/version_N/checkpoints/)"
    names = ", ".join(p.name for p in others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
    return f"pass another one, e.g. {others[0]} ({path.parent} holds {names})"


def _short(err: BaseException) -> str:
    """The first line of an error, at most 120 characters."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _zip_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete zip archive (what ``torch.save`` writes), or None. Reads the whole file:
    every member's checksum."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        with path.open("rb") as handle:
            head = handle.read(4)
        if not head:
            return "an empty file"
        if head == b"PK\x03\x04":  # a zip archive's start without its index at the end
            return "truncated: the zip archive ends before its index"
        return "not a zip archive, which torch.save writes"
    except (OSError, EOFError, ValueError) as err:  # e.g. a member that ends early
        return f"truncated or unreadable: {_short(err)}"
    return f"the member {bad} fails its checksum" if bad is not None else None


def check_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a checkpoint of this project that loads, else ``BadInput`` naming it and what to pass.

    Cheap next to what follows it: the whole file is read once (the zip archive's checksums) and its pickle
    is loaded memory-mapped, with ``weights_only=True`` as Lightning's own load does, leaving the tensors
    on disk.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no checkpoint at {path}; {_beside(path)}")
    problem = _zip_problem(path)
    checkpoint = None
    if problem is None:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on a bad pickle
            problem = _short(err)
    if problem is not None:
        raise BadInput(f"{path} is not a readable checkpoint ({problem}); {_beside(path)}")
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise BadInput(f"{path} is not a checkpoint of this project (it has no {' or '.join(missing)}, which "
                       f"`python -m metacontrastive fit` writes); {_beside(path)}")
    return path


def check_ckpt_path(ckpt: str | None) -> None:
    """``check_checkpoint`` on a ``--ckpt_path`` that names a file: not ``untrained`` or ``last`` (see
    ``resolve_run``), Lightning's ``best`` and ``hpc``, a registry name or a URL."""
    if ckpt is None or str(ckpt) in (UNTRAINED, "last", "best", "hpc"):
        return
    if "://" not in str(ckpt) and not str(ckpt).startswith("registry"):
        check_checkpoint(ckpt)


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
        raise BadInput(f"cannot write logs to {folder}: {err.strerror or err}; choose a writable folder with "
                       f"--trainer.logger.init_args.save_dir=DIR") from None


def resolve_run(config, subcommand: str) -> None:
    """Apply ``--run`` and ``--ckpt_path last`` / ``untrained`` to a parsed LightningCLI config, in place
    (see the module docstring). Raises ``BadInput`` on a run that cannot be."""
    ckpt, run, logger = config.ckpt_path, config.get("run"), _logger_args(config)
    if subcommand in ("validate", "test") and ckpt is None:
        raise BadInput(f"{subcommand} scores a trained model: pass --ckpt_path PATH, --ckpt_path last (the newest run), "
                       f"or --ckpt_path {UNTRAINED} to score a freshly initialised one on purpose")
    if ckpt == UNTRAINED:
        config.ckpt_path = None
        return
    if logger is None:
        if run is not None or ckpt == "last":
            raise BadInput("--run and --ckpt_path last need the TensorBoard logger of conf/default.yaml")
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
            raise BadInput(f"--ckpt_path last: no checkpoints/last.ckpt under {where}; start the run first "
                           f"(`make train`), or name a checkpoint with --ckpt_path PATH")
        config.ckpt_path, logger.version = str(check_checkpoint(last)), folder.name
    elif subcommand == "fit" and folder is not None and (folder / "checkpoints").exists():
        raise BadInput(f"run folder {folder} already holds checkpoints: resume it with --ckpt_path last "
                       f"(`make train RESUME=1 RUN={folder.name}`), or name another --run")
    if subcommand == "fit":
        _check_writable(Path(logger.save_dir))
