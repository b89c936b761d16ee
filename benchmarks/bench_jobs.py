"""One spec of independent parts run four ways, in one run: serial in one process at the default
torch thread count, serial at one thread, on two local workers (one thread each), and on a
two-node local Ray cluster (one CPU per node). Each way starts from an empty store (the
converted weights are shared) and loads the model itself, as a user would.

Prints wall time per way, ratios against both serial runs, and the overhead per part:
``(wall - sum(part compute seconds) / ways_in_parallel) / n_parts``, compute seconds read from
the stored manifests (each part's own measured compute). Usage:
``python benchmarks/bench_jobs.py [--model smollm2-135m] [--parts 8]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spec_text(model: str, n: int) -> str:
    parts = "\n".join(
        f'[[analysis]]\nname = "head_detectors"\n'
        f'tasks = [{{ name = "induction", seq_len = 40, n_prompts = {24 + i} }}]\n'
        for i in range(n)
    )
    return f'title = "bench-jobs"\n[defaults]\nmodels = ["{model}"]\n' + parts


def fresh_home(base: Path, name: str) -> Path:
    from workbench.home import workbench_home

    home = base / name
    home.mkdir()
    (home / "models").symlink_to(workbench_home() / "models", target_is_directory=True)
    return home


def run(cmd: list[str], home: Path) -> float:
    env = {**os.environ, "WORKBENCH_HOME": str(home)}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def compute_seconds(home: Path) -> float:
    from workbench.store import ResultStore

    store = ResultStore(home / "store")
    runs = store.list_runs()
    return float(runs["seconds"].sum()), len(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--parts", type=int, default=8)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    spec = base / "spec.toml"
    spec.write_text(spec_text(args.model, args.parts))
    cli = [sys.executable, "-m", "workbench.cli", "run", str(spec), "--no-progress"]
    serial = (
        "import sys, torch; torch.set_num_threads(int(sys.argv[1])) if sys.argv[1] != '0' "
        "else None; from workbench.spec import load_spec, run_spec; "
        "run_spec(load_spec(sys.argv[2]), progress=False)"
    )
    import torch

    default_threads = torch.get_num_threads()
    results: dict[str, tuple[float, int]] = {}
    walls: dict[str, float] = {}
    for name, cmd, parallel in (
        (f"serial, {default_threads} threads", [sys.executable, "-c", serial, "0", str(spec)], 1),
        ("serial, 1 thread", [sys.executable, "-c", serial, "1", str(spec)], 1),
        ("--workers 2 (1 thread each)", [*cli, "--workers", "2", "--threads", "1"], 2),
    ):
        home = fresh_home(base, name.split(",")[0].split(" ")[0].strip("-") + str(len(walls)))
        walls[name] = run(cmd, home)
        results[name] = (*compute_seconds(home), parallel)  # type: ignore[assignment]
    from workbench.jobs.cluster import start_local_cluster

    t0 = time.perf_counter()
    with start_local_cluster(nodes=2, cpus_per_node=1) as cluster:
        start = time.perf_counter() - t0
        home = fresh_home(base, "ray")
        name = "Ray, 2 nodes x 1 CPU"
        walls[name] = run([*cli, "--ray", cluster.address], home)
        results[name] = (*compute_seconds(home), 2)  # type: ignore[assignment]
    print(f"model {args.model}, {args.parts} independent parts (head detectors), 2 cores; "
          f"local Ray cluster start {start:.1f}s (not counted)")  # fmt: skip
    ref_default = walls[f"serial, {default_threads} threads"]
    ref_one = walls["serial, 1 thread"]
    for name, wall in walls.items():
        total, n, parallel = results[name]  # type: ignore[misc]
        overhead = (wall - total / parallel) / max(n, 1)
        print(
            f"{name:<30} {wall:7.1f}s  vs default serial {ref_default / wall:4.2f}x, vs 1-thread "
            f"serial {ref_one / wall:4.2f}x; overhead {overhead:5.2f}s/part "
            f"({n} parts stored, compute {total:.1f}s)"
        )
    workers, ray_wall = walls["--workers 2 (1 thread each)"], walls["Ray, 2 nodes x 1 CPU"]
    print(f"Ray / local workers wall time: {ray_wall / workers:.2f}")


if __name__ == "__main__":
    main()
