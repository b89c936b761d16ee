"""Foundation benchmark: model load (cold GGUF conversion vs warm safetensors cache) and a spec
run computed vs answered from the store, each as a whole CLI command in a fresh process.

Usage: python benchmarks/bench_foundation.py [--model smollm2-135m] [--spec analyses/demo.toml]
Prints both sides and their ratios; asserts nothing (targets live here, not in tests).
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


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return dt, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default=str(ROOT / "analyses" / "demo.toml"))
    ap.add_argument("--skip-cold", action="store_true", help="skip the cold GGUF conversion")
    args = ap.parse_args()

    load = (
        "import time; t=time.perf_counter(); from workbench.models.loading import load_model; "
        f"m=load_model({args.model!r}); print(f'{{time.perf_counter()-t:.2f}}', m.cache_hit)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "WORKBENCH_HOME": tmp, "PYTHONUNBUFFERED": "1"}
        if not args.skip_cold:
            cold, out = timed([sys.executable, "-c", load], env)
            warm, out2 = timed([sys.executable, "-c", load], env)
            print(
                f"load {args.model}: cold (GGUF de-quantise + convert) {cold:.1f}s "
                f"[in-process {out.split()[0]}s], warm (safetensors cache) {warm:.1f}s "
                f"[in-process {out2.split()[0]}s]; ratio {cold / warm:.1f}x"
            )
        cli = [sys.executable, "-m", "workbench.cli", "run", args.spec, "--no-progress"]
        first, o1 = timed(cli, env)
        second, o2 = timed(cli, env)
        print(
            f"spec {Path(args.spec).name}: first run (computes) {first:.2f}s, second run "
            f"(from the store) {second:.2f}s; ratio {first / second:.1f}x"
        )
        print("  first: ", o1.strip().splitlines()[-1])
        print("  second:", o2.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
