"""DDP with the inagg communication hook, through scripts/torch_ddp.py: replicas end
identical, the loss goes down, and f32 through inagg matches DDP's own allreduce."""

import json
import os
import subprocess
import sys

from conftest import ROOT, inagg_bin


def test_ddp_with_the_hook_on_two_processes(aggregator):
    env = dict(os.environ, INAGG_AGGREGATOR=aggregator.addr, INAGG_BIN=inagg_bin())
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/torch_ddp.py"), "--workers", "2", "--steps", "12",
         "--codecs", "f32,i8", "--json", "--job", "500"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    rows = {row["codec"]: row for row in rows}
    assert set(rows) == {"gloo", "f32", "i8"}
    for codec, row in rows.items():
        assert row["replicas_identical"], row
        assert row["final_loss"] < row["first_loss"], row
    assert rows["f32"]["max_param_diff_vs_gloo"] < 1e-5, rows["f32"]
    # i8 puts about a quarter of f32's bytes on the wire.
    assert rows["i8"]["bytes_per_step"] < 0.35 * rows["f32"]["bytes_per_step"]
