"""CPU training throughput of 1 process (2 threads) vs 2 processes (1 thread each, gloo), the same
global batch, FP and binary. Writes bench/results/distributed.{json,md}.

    python bench/distributed.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import write_results

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def main() -> None:
    script = str(HERE / "throughput.py")
    rows = [run([sys.executable, script], 2),
            run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script], 1)]
    lines = ["| processes x threads | global batch | fp32 img/s | binary img/s |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} x {r['threads_per_process']} | {r['global_batch']} | {r['fp32_img_s']} | {r['binary_img_s']} |")
    lines.append("")
    lines.append(f"2 processes vs 1: fp32 {rows[1]['fp32_img_s'] / rows[0]['fp32_img_s']:.2f}x, "
                 f"binary {rows[1]['binary_img_s'] / rows[0]['binary_img_s']:.2f}x (same 2 cores).")
    write_results("distributed", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
