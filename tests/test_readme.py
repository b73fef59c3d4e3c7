"""The README's commands work as written.

- Every shell block of README.md marked by the line ``<!-- readme-test -->`` right before it runs, in order, as one
  bash script (``set -euo pipefail``) in a scratch copy of the repository (its files linked; data/, logs/ and runs/
  its own), with ``D`` pointing at small image folders written here in the layout of ``../shared/data``. The one
  change to the commands: the copy's ``.venv/bin/python``, first on PATH and the interpreter the Makefile calls,
  runs this venv's interpreter with small step, episode and size options appended to ``-m metacontrastive
  fit|validate|test|evaluate`` (an option's last value wins), so option names, paths and the order of the commands
  stay as written. A command that refuses, collides with an earlier one or names a missing option fails the test.
- Every ``make``, ``python -m metacontrastive``, ``torchrun``, ``srun`` and ``python bench/...`` command in the
  bash blocks of README.md, data/README.md and docs/*.md, marked or not, and in their inline code spans (those
  without an elided ``...``), is parsed but not run: bash expands each block with those commands replaced by
  functions that record their arguments. Make targets and variables must exist (``make -n`` shows what a target
  runs, parsed in turn); fit, validate and test go through LightningCLI with ``--print_config``, evaluate and prepare
  through their parsers, and a bench script's options must appear in its ``--help``. Options named in the prose
  (``--model.x``, ``data.y``, ...) must be arguments of the classes LightningCLI reads.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCUMENTS = [README, REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = "<!-- readme-test -->"
# appended to the README's training and evaluation commands: seconds, not minutes, on 2 cores
FIT_SMALL = ["--trainer.max_steps=2", "--data.steps_per_epoch=2", "--data.val_episodes=2", "--data.test_episodes=2",
             "--data.shots=2", "--data.queries=2", "--trainer.enable_progress_bar=false"]
EVALUATE_SMALL = ["--episodes", "2", "--queries", "3"]
# the image folders of ../shared/data that the README's marked blocks read, with their classes
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DTD = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
       "crystalline"]
MRI = ["glioma", "meningioma", "notumor", "pituitary"]
FOLDERS = {"cifar10-test": (CIFAR, "RGB"), "dtd-textures": (DTD, "RGB"), "brain-tumor-mri/Testing": (MRI, "L")}
PER_CLASS = 10  # 5 shots + 3 queries of the evaluation commands, and more
# kept out of the scratch copy: what the README's commands write
OWN = {".venv", ".git", "data", "logs", "runs", "results", "lightning_logs", ".pytest_cache"}


def bash_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, marked) of every ```bash block of a markdown file."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((i + 1, "\n".join(lines[i + 1:end]), i > 0 and lines[i - 1].strip() == MARK))
            i = end
        i += 1
    return blocks


def inline_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of the inline code spans outside code blocks that are commands."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out += [(n, span) for span in re.findall(r"`([^`]+)`", line)
                    if re.match(r"(make |python -m metacontrastive |python bench/|srun |torchrun )", span)
                    and "..." not in span]
    return out


# ---------------------------------------------------------------------------------------------- the marked blocks


def _image_folders(root: Path) -> Path:
    """``PER_CLASS`` small JPEGs per class, each class its own colour plus noise, in the layout of ../shared/data."""
    rng = np.random.default_rng(0)
    for folder, (classes, mode) in FOLDERS.items():
        for c, name in enumerate(classes):
            (root / folder / name).mkdir(parents=True)
            colour = rng.integers(0, 256, 3)
            for j in range(PER_CLASS):
                pixels = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                (image.convert("L") if mode == "L" else image).save(root / folder / name / f"{j:04d}.jpg")
    return root


def _scratch_copy(root: Path) -> Path:
    """The repository's files linked into ``root``, with their own output folders and a ``.venv/bin/python`` that
    appends the small options to the project's training and evaluation commands."""
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in OWN:
            (root / entry.name).symlink_to(entry)
    (root / "data").mkdir()
    (root / "data" / "README.md").symlink_to(REPO / "data" / "README.md")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    fit, evaluate = " ".join(map(shlex.quote, FIT_SMALL)), " ".join(map(shlex.quote, EVALUATE_SMALL))
    (bin_dir / "python").write_text(f"""#!/usr/bin/env bash
# the venv's interpreter; the README test's small options after the project's training and evaluation commands
if [ "$1" = -m ] && [ "$2" = metacontrastive ]; then
  case "$3" in
    fit|validate|test) exec {shlex.quote(sys.executable)} "$@" {fit} ;;
    evaluate) exec {shlex.quote(sys.executable)} "$@" {evaluate} ;;
  esac
fi
exec {shlex.quote(sys.executable)} "$@"
""")
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    (root / ".venv" / ".installed").touch()  # newer than pyproject.toml: make's install step has nothing to do
    return root


def _environment(**extra: str) -> dict[str, str]:
    """This environment without the Makefile's variables (make reads them from the environment) and make's own."""
    names = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", (REPO / "Makefile").read_text(), re.M))
    env = {k: v for k, v in os.environ.items() if k not in names | {"MAKEFLAGS", "MAKELEVEL", "MFLAGS"}}
    return {**env, **extra}


def test_every_marker_is_followed_by_a_bash_block():
    lines = README.read_text().splitlines()
    marks = [n for n, line in enumerate(lines) if line.strip() == MARK]
    assert marks, "README.md marks no block for the test"
    assert all(lines[n + 1].strip() == "```bash" for n in marks)


@pytest.mark.slow
def test_the_marked_blocks_run_in_order(tmp_path):
    data = _image_folders(tmp_path / "shared-data")
    checkout = _scratch_copy(tmp_path / "repo")
    parts = ["set -euo pipefail"]
    for line, text, marked in bash_blocks(README):
        if marked:
            parts += [f"echo \"### README.md line {line} (at $SECONDS s)\"", text]
    script = tmp_path / "readme.sh"
    script.write_text("\n".join(parts) + "\n")
    env = _environment(PATH=f"{checkout / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", D=str(data),
                       OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(["bash", str(script)], cwd=checkout, env=env, capture_output=True, text=True, timeout=1200)
    output = done.stdout + done.stderr
    blocks = re.findall(r"### README.md line \d+", done.stdout)
    assert done.returncode == 0, f"the README block after {blocks[-1] if blocks else 'none'} failed:\n{output[-6000:]}"
    # what the README says these commands leave behind
    assert "final validation accuracy natural" in done.stdout
    for folder in ("logs/dcmcl/version_0", "logs/pretrained/mine", "runs/eval-mri"):
        assert (checkout / folder / "results.md").is_file(), folder
    assert (checkout / "logs/dcmcl/version_0/checkpoints/last.ckpt").is_file()
    assert any((checkout / "runs/shards/natural/features").iterdir())  # the feature cache beside the shards


# -------------------------------------------------------------------------------------------- every command parses

_STUBS = r"""
_record() { local a; for a in "$@"; do printf '%s\x1f' "$a"; done >> "$RECORD"; printf '\x1e' >> "$RECORD"; }
python() { _record python "$@"; }
.venv/bin/python() { _record python "$@"; }
make() { _record make "$@"; }
torchrun() { _record torchrun "$@"; }
srun() { _record srun "$@"; }
source() { :; }
"""


def _recorded(text: str, tmp_path: Path) -> list[list[str]]:
    """The commands a shell snippet runs, as bash expands them, without running any (PATH is empty)."""
    record = tmp_path / "record"
    record.write_bytes(b"")
    done = subprocess.run([shutil.which("bash"), "-c", _STUBS + text], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": str(tmp_path / "nothing"), "RECORD": str(record), "D": "../shared/data",
                               "HOME": str(tmp_path)}, timeout=60)
    assert "syntax error" not in done.stderr, done.stderr
    return [entry.split("\x1f")[:-1] for entry in record.read_text().split("\x1e")[:-1]]


def _makefile() -> tuple[set[str], set[str]]:
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):(?!=)", text, re.M))
    variables = set(re.findall(r"^([A-Z_]+)\s*\?=", text, re.M))
    return targets, variables


def _expand_make(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """Problems with a make command, and the project commands its recipe runs (``make -n``)."""
    targets, variables = _makefile()
    problems, settings, goals = [], [], []
    for arg in argv:
        if "=" in arg:
            name = arg.split("=", 1)[0]
            problems += [] if name in variables else [f"make has no variable {name}"]
            settings.append(arg)
        elif arg.startswith("-"):
            problems.append(f"make option {arg} in a README command")
        else:
            problems += [] if arg in targets else [f"make has no target {arg}"]
            goals.append(arg)
    if problems:
        return problems, []
    if "eval" in goals and not any(s.startswith("CKPT=") for s in settings):
        settings.append("CKPT=logs/dcmcl/version_0/checkpoints/last.ckpt")  # what `make eval` finds after a run
    done = subprocess.run(["make", "-n", "--no-print-directory", *goals, *settings], cwd=REPO, capture_output=True,
                          text=True, env=_environment(), timeout=60)
    if done.returncode != 0:
        return [f"make -n {' '.join(argv)}: {done.stderr.strip()}"], []
    recipe = re.sub(r"\\\n", " ", done.stdout)
    commands = [shlex.split(line) for line in recipe.splitlines() if "metacontrastive" in line or "bench/" in line]
    return [], [["python", *c[1:]] if c[0].endswith("/python") else c for c in commands if "-m" in c or "bench/" in " ".join(c)]


def _project_command(argv: list[str]) -> tuple[str, list[str]] | str:
    """(kind, arguments) for the validator, or what is wrong."""
    if argv[0] == "srun":
        return _project_command(argv[1:])
    if argv[0].endswith("torchrun"):  # also the .venv/bin/torchrun of a make recipe
        if "-m" not in argv:
            return f"torchrun without -m: {argv}"
        argv = ["python", *argv[argv.index("-m"):]]
    if argv[0].endswith("python") and argv[1:3] == ["-m", "metacontrastive"] and len(argv) > 3:
        sub, rest = argv[3], argv[4:]
        if sub in ("fit", "validate", "test"):
            # a run's own config.yaml (``-c logs/<name>/<run>/config.yaml``) exists only after that run: parse the
            # command's options against the preset the run was made from
            rest = ["conf/pretrained.yaml" if re.fullmatch(r"logs/.+/config\.yaml", a) and not (REPO / a).exists()
                    else a for a in rest]
            return "lightning", [sub, *rest]
        if sub in ("evaluate", "prepare"):
            return sub, rest
        return f"python -m metacontrastive has no subcommand {sub}"
    if argv[0].endswith("python") and len(argv) > 1 and argv[1].startswith("bench/"):
        return ("bench", argv[1:]) if (REPO / argv[1]).is_file() else f"no script {argv[1]}"
    return f"not a project command: {' '.join(argv)}"


_VALIDATOR = r"""
import contextlib, inspect, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
import lightning
from metacontrastive.cli import _evaluate_parser, main
from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.prepare import build_parser
from metacontrastive.models.clip import EncoderConfig
from metacontrastive.module import MetaContrastiveModule

def run(kind, args):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if kind == "lightning":
                main(args + ([] if "--print_config" in args or "--help" in args else ["--print_config"]))
            elif kind == "evaluate":
                _evaluate_parser().parse_args(args)
            elif kind == "prepare":
                build_parser().parse_args(args)
            elif kind == "bench":
                sys.argv = [args[0], "--help"]
                runpy.run_path(args[0], run_name="__main__")
    except SystemExit as exit:
        code = exit.code or 0
    except Exception as exn:
        return f"{type(exn).__name__}: {exn}"
    if kind == "bench":
        unknown = [a.split("=")[0] for a in args[1:] if a.startswith("--") and a.split("=")[0] not in out.getvalue()]
        return f"{args[0]} --help names no {unknown}" if unknown else None
    return None if code == 0 else (err.getvalue().strip().splitlines() or ["exit %s" % code])[-1]

names = {"model": set(inspect.signature(MetaContrastiveModule).parameters),
         "model.encoder": set(EncoderConfig.__dataclass_fields__),
         "data": set(inspect.signature(EpisodicDataModule).parameters),
         "trainer": set(inspect.signature(lightning.Trainer).parameters)}
request = json.load(sys.stdin)
problems = [f"{where}: {problem}" for where, kind, args in request["commands"] if (problem := run(kind, args))]
for where, option in request["options"]:
    parts = option.split(".")
    scope, name = (("model.encoder", parts[2]) if parts[:2] == ["model", "encoder"] and len(parts) > 2
                   else (parts[0], parts[1]))
    if name not in names[scope]:
        problems.append(f"{where}: {option} is no option ({scope} has no {name})")
print(json.dumps(problems))
"""

_OPTION = re.compile(r"(?<![\w./-])(?:--)?((?:model|data|trainer)\.[a-z_]+(?:\.[a-z_]+)*)")


def _prose_options(path: Path) -> list[tuple[str, str]]:
    """(where, option) for each ``model.*``, ``data.*``, ``trainer.*`` option a document's code spans name."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        for span in re.findall(r"`([^`]+)`", line) + ([line] if line.startswith(("python", "make", "    --")) else []):
            out += [(f"{path.name}:{n}", m) for m in _OPTION.findall(span)]
    return out


def test_make_targets_and_subcommands_named_in_the_documents_exist(tmp_path):
    targets, variables = _makefile()
    problems = []
    for path in DOCUMENTS:
        snippets = [(line, text) for line, text, _ in bash_blocks(path)] + inline_commands(path)
        for line, text in snippets:
            for argv in _recorded(text, tmp_path):
                where = f"{path.relative_to(REPO)}:{line}"
                if argv[0] == "make":
                    problems += [f"{where}: make has no target {a}" for a in argv[1:] if "=" not in a and a not in targets]
                    problems += [f"{where}: make has no variable {a.split('=')[0]}" for a in argv[1:]
                                 if "=" in a and a.split("=")[0] not in variables]
                else:
                    kind = _project_command(argv)
                    problems += [f"{where}: {kind}"] if isinstance(kind, str) else []
    assert not problems, "\n".join(problems)
    listed = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, env=_environment()).stdout
    assert all(t in listed for t in targets - {"help"}), "a target without a ## help line"


@pytest.mark.slow
def test_every_command_in_the_documents_parses(tmp_path):
    commands, problems, options = [], [], []
    for path in DOCUMENTS:
        snippets = [(line, text) for line, text, _ in bash_blocks(path)] + inline_commands(path)
        for line, text in snippets:
            where = f"{path.relative_to(REPO)}:{line}"
            for argv in _recorded(text, tmp_path):
                expanded = [argv]
                if argv[0] == "make":
                    found, expanded = _expand_make(argv[1:])
                    problems += [f"{where}: {p}" for p in found]
                for command in expanded:
                    kind = _project_command(command)
                    if isinstance(kind, str):
                        problems.append(f"{where}: {kind}")
                    else:
                        commands.append((where, *kind))
        options += _prose_options(path)
    assert len(commands) > 20
    done = subprocess.run([sys.executable, "-c", _VALIDATOR], cwd=REPO, capture_output=True, text=True, timeout=600,
                          input=json.dumps({"commands": commands, "options": options}),
                          env=_environment(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert done.returncode == 0, done.stderr[-4000:]
    problems += json.loads(done.stdout.strip().splitlines()[-1])
    assert not problems, "\n".join(problems)
