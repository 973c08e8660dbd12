"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on a converted model: two CPU processes
(gloo) under torchrun train with ``ratio_loss`` and ``project_ratios`` and end with identical
routers and ratios. Before the fix, backward failed with "aten.mul.Tensor got mixed
torch.Tensor and DTensor" (the DDP unused-parameter term of ratio_loss added the sharded
ratio parameters to a loss built from their unsharded values)."""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(__file__), "fsdp2_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_training_with_ratio_loss_keeps_ranks_identical():
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    with tempfile.TemporaryDirectory() as out:
        for attempt in range(2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), WORKER]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                               cwd=tempfile.gettempdir(),
                               env={**os.environ, "OMP_NUM_THREADS": "1",
                                    "DIFFCR_RESULT_DIR": out})
            # gloo on this 2-core machine aborts a rank now and then inside c10d (about one
            # run in ten, also before this test's code changed): one more run, then strict
            if r.returncode == 0 or "terminate called without an active exception" \
                    not in r.stderr:
                break
        assert r.returncode == 0, r.stderr[-4000:]
        results = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    assert sorted(res["rank"] for res in results) == [0, 1]
    a, b = results
    assert a["ratios"] == b["ratios"] and a["routers"] == b["routers"]
    ratios = torch.tensor(a["ratios"])
    assert not torch.equal(ratios, torch.tensor([[0.55, 0.75]] * 2))  # they trained
    assert ((ratios >= 0.1) & (ratios <= 1.0)).all()
    assert any(abs(v) > 0 for row in a["routers"] for v in row)
