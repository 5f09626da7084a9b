"""One process of a distributed training run, as torchrun starts it for launch.py:

    python -m torch.distributed.run --standalone --nproc-per-node N -m training.engine.ddp_rank RUN_DIR

It reads RUN_DIR/ddp/request.json and RUN_DIR/manifest.json, joins the process group (distributed.dist_from_env)
and runs train_model with it. Rank 0 trains into RUN_DIR, reports progress to RUN_DIR/ddp/progress.json and its
metrics to RUN_DIR/ddp/result.json; a rank k > 0 is only given RUN_DIR/ddp/rank-k/ as its folder and writes
nothing there. A failing process writes RUN_DIR/ddp/error-<rank>.json before it exits. Pure: no Django."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from .launch import DDP_DIR, LAUNCHER_PID_ENV, ProgressFile, write_error, write_pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.engine.ddp_rank", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir
    ddp = run_dir / DDP_DIR
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    write_pid(ddp, rank)
    # DDP's note on depthwise-conv gradients whose strides differ only on a dimension of size 1 (same layout).
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    try:
        from .distributed import barrier, dist_from_env, shutdown  # noqa: PLC0415 - torch after the pid is known
        from .loop import train_model  # noqa: PLC0415

        request = json.loads((ddp / "request.json").read_text(encoding="utf-8"))
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        config = request["config"]
        dist = dist_from_env(config["device"], timeout_s=request["collective_timeout_s"])
        try:
            launcher = os.environ.get(LAUNCHER_PID_ENV)
            metrics = train_model(
                manifest,
                config,
                run_dir if dist.is_main else ddp / f"rank-{rank}",
                progress=ProgressFile(ddp / "progress.json", int(launcher) if launcher else None)
                if dist.is_main
                else None,
                resume=request["resume"],
                fresh=request["fresh"],
                cache_dir=request["cache_dir"],
                dist=dist,
            )
            if dist.is_main:
                from .atomic import write_json_atomic  # noqa: PLC0415

                write_json_atomic(ddp / "result.json", metrics)
            # Every rank leaves together: a rank tearing down its process group while rank 0 still writes (or still
            # talks to it) aborts in gloo ("terminate called without an active exception", SIGABRT).
            barrier()
        finally:
            shutdown()
    except BaseException as exc:
        write_error(ddp, rank, exc, traceback.format_exc())
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
