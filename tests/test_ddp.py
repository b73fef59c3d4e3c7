"""Two-rank DDP on CPU (gloo) through torchrun and the real entry point: after a few steps both ranks hold the
same parameters, each rank trained on its own episodes, and the alignment term gathered every rank's rows."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HELPERS = Path(__file__).parent / "helpers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_end_with_identical_parameters_after_different_episodes(fit_args, tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "metacontrastive", *fit_args,
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=4",
            "--trainer.enable_progress_bar=false", "--model.gather_align=true", "--threads=1",
            "--trainer.callbacks+=ddp_probe.DDPProbe"]
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MC_DDP_DIR": str(tmp_path)}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    params = [torch.load(tmp_path / f"params-{rank}.pt") for rank in (0, 1)]
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name
    initial = torch.load(tmp_path / "initial-0.pt")
    assert any(not torch.equal(initial[n], params[0][n]) for n in initial)  # the steps did train
    episodes = [(tmp_path / f"episodes-{rank}.txt").read_text().split("\n") for rank in (0, 1)]
    steps = [{line.split()[0] for line in e if line} for e in episodes]
    assert steps[0] == steps[1] == {"0", "1", "2", "3"}  # both ranks took every step
    seen = [{line.split()[1] for line in e if line} for e in episodes]
    assert not seen[0] & seen[1]  # no task trained on by both ranks
