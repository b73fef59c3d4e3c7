"""``python -m metacontrastive``: ``prepare ...`` runs the shard converters (without importing Lightning
or the models, so data preparation starts fast); ``evaluate ...`` scores a checkpoint with every few-shot
method; anything else goes to the LightningCLI in ``cli.py``.

An input the user must fix (``metacontrastive.errors.BadInput``) ends the command with one line and exit
status 2, without a traceback."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from metacontrastive.errors import BadInput

    try:
        _dispatch(argv)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _dispatch(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["prepare"]:
        from metacontrastive.data.prepare import main as prepare_main

        prepare_main(args[1:])
    elif args[:1] == ["evaluate"]:
        from metacontrastive.cli import evaluate_main

        evaluate_main(args[1:])
    else:
        import torch.distributed as dist

        from metacontrastive.cli import main as cli_main

        try:
            cli_main(argv)  # None: LightningCLI reads sys.argv itself
        finally:
            # a DDP rank that exits with its process group alive can abort in the group's threads at interpreter exit
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
