"""Shared helpers for benchmark scripts: environment capture and result writing."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def environment(extra_modules=()) -> dict:
    import numpy

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "numpy": numpy.__version__,
    }
    for name in extra_modules:
        try:
            env[name] = __import__(name).__version__
        except Exception:  # optional module missing
            env[name] = None
    return env


def profile_rows(fn, calls: int, top: int = 30) -> list[dict]:
    """cProfile of ``calls`` calls of ``fn``: the ``top`` functions by own time, per call of ``fn``
    (``calls``: how often a function ran, ``own_us`` / ``cum_us``: microseconds)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    rows = [dict(function=f"{Path(file).name}:{line}({name})", calls=nc / calls, own_us=tt / calls * 1e6,
                 cum_us=ct / calls * 1e6)
            for (file, line, name), (_, nc, tt, ct, _) in pstats.Stats(prof).stats.items()]
    rows.sort(key=lambda r: -r["own_us"])
    return rows[:top]


def write_results(stem: str, env: dict, rows: list[dict], markdown_table: str, notes: str = "") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    head = "\n".join(f"- {k}: {v}" for k, v in env.items())
    (RESULTS / f"{stem}.md").write_text(f"# {stem}\n\n{head}\n\n{markdown_table}\n{notes}\n")
    print(markdown_table)
