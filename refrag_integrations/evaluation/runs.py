"""Bookkeeping shared by the benchmark and the evaluations: the machine description, atomic JSON
writes, resumable JSONL logs, and the run signature that makes a rerun continue only a run with
the same settings.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable


def machine_info(device: Any = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU model and cores, memory, torch threads, GPU."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # psutil is optional; the description just loses one field
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else "cpu",
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none): a noisy machine shows here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def command_line() -> str:
    """The command that is running, as a copy-pasteable string."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("refrag", "__main__.py")):
        argv[0] = "refrag"
    return " ".join(shlex.quote(a) for a in argv)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): an interrupted write never corrupts results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or pass another --out.") from err


def check_signature(path: Path, signature: dict[str, Any], overwrite: bool = False) -> None:
    """Make ``path`` (a run's ``run.json``) hold ``signature``; refuse to mix two different runs.

    Raises:
        ValueError: the directory holds a run made with other settings (and ``overwrite`` is False).
    """
    if path.is_file() and not overwrite:
        old = read_json(path)
        diff = {k: (old.get(k), v) for k, v in signature.items() if old.get(k) != v}
        diff.update({k: (v, None) for k, v in old.items() if k not in signature})
        if diff:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(
                f"{path.parent} holds results of a run with other settings ({lines}). "
                "Resume it with the same options, pass another --out, or --overwrite to start over."
            )
    write_json(path, signature)


def resume_log(signature_path: Path, signature: dict[str, Any], log_path: Path, overwrite: bool = False) -> "JsonlLog":
    """Open a resumable run: check (or write) its signature (:func:`check_signature`), forget the
    finished items when ``overwrite``, and return the log of finished items.

    Raises:
        ValueError: the directory holds a run made with other settings (and ``overwrite`` is False).
    """
    check_signature(signature_path, signature, overwrite=overwrite)
    if overwrite and log_path.is_file():
        log_path.unlink()
    return JsonlLog(log_path)


class JsonlLog:
    """Append-only JSONL of finished work items, keyed by a string; a rerun skips finished keys.

    A line cut short by an interruption is ignored (and overwritten by the rerun).

    Example:
        >>> log = JsonlLog(tmp / "predictions.jsonl")        # doctest: +SKIP
        >>> if "rag|5|2001" not in log: log.append({"key": "rag|5|2001", "match": 1.0})  # doctest: +SKIP
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            good: list[str] = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a partial last line from an interrupted run
                if isinstance(rec, dict) and "key" in rec:
                    self.records[rec["key"]] = rec
                    good.append(line)
            self.path.write_text("".join(f"{g}\n" for g in good), encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> None:
        if "key" not in record:
            raise ValueError("a JsonlLog record needs a 'key'.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record

    def values(self) -> Iterable[dict[str, Any]]:
        return self.records.values()
