"""Where a result came from, and writing it without ever leaving a half-written file.

Every JSON pudding writes carries :func:`provenance`: the git commit (and whether the tree was dirty), the
UTC date, the command line, and the versions of the libraries that decide the numbers.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

_VERSIONED = ("pudding", "torch", "transformers", "datasets", "tokenizers", "safetensors", "numpy")


def git_commit(cwd: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` for the repository holding ``cwd`` (default: this file)."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, check=True, timeout=10).stdout
        return {"commit": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance() -> dict[str, Any]:
    """The record stamped into every result: git state, date, command, versions, machine."""
    return {
        "git": git_commit(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "versions": library_versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), **cpu_description()},
    }


# fbgemm's int8 kernels need AVX2, torch._int_mm is fast only with VNNI or AMX, bf16 products need AVX-512 BF16 or AMX.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")


def cpu_description(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's model name and which of :data:`SPEED_FLAGS` it has (empty off Linux): timings are only
    comparable between machines with the same ones."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)  # CPU 0
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name"), "cpu_flags": [f for f in SPEED_FLAGS if f in flags]}


def _read_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on failure deleted.

    For writers that want a file name (parquet, safetensors, matplotlib): a reader, or a crash, never
    sees a partial file, only the old content or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 files, and some writers (safetensors' save_file) replace the file with a new
        # 0600 one, so the mode is set after writing: results are meant to be read by others.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


LOCK_SUFFIX = ".pudding.lock"


@contextmanager
def exclusive_output(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on an output file or folder for as long as one process writes it.

    A second writer (another ``pudding`` process on the same ``--out`` or ``--run-dir``) is refused at once
    with a ConfigError rather than left to interleave its files with the first one's. The lock is a sibling
    file (``.<name>.pudding.lock``), so the output folder itself only ever holds results; the OS releases it
    when the holder exits, even by ``kill -9``.
    """
    from filelock import FileLock, Timeout

    from pudding.core.errors import ConfigError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(f".{path.name}{LOCK_SUFFIX}"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(f"{path} is being written by another pudding process; wait for it to finish "
                          "or choose another output") from None
    try:
        yield path
    finally:
        lock.release()


def locks_output(*attributes: str) -> Callable:
    """Make a stage hold :func:`exclusive_output` on its config's output folders while it runs.

    ``@locks_output("run_dir")`` on ``build_labels(config, ...)`` refuses a second process labelling into
    the same run folder, whose shards and identity file would otherwise interleave with the first one's.
    Attributes that are None (no output asked for) are skipped.
    """
    def decorate(stage: Callable) -> Callable:
        @functools.wraps(stage)
        def locked(config, *args, **kwargs):
            with ExitStack() as stack:
                for name in attributes:
                    if getattr(config, name) is not None:
                        stack.enter_context(exclusive_output(getattr(config, name)))
                return stage(config, *args, **kwargs)
        return locked
    return decorate


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; on success it becomes ``path``, on failure it is deleted.

    The temporary name is unique per call (``mkdtemp``), so two writers never share it, and ``path`` must be
    absent or empty: a finished folder is never replaced. Files are made readable like any other output
    (``mkdtemp`` makes the folder 0700, and some writers make 0600 files).
    """
    from pudding.core.errors import ConfigError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield tmp
        _make_readable(tmp)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        elif path.exists():
            raise ConfigError(f"{path} appeared while it was being written; the new copy was discarded")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    os.chmod(folder, 0o777 & ~_UMASK)
    for item in folder.rglob("*"):
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~_UMASK)


def atomic_write_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (see :func:`atomic_output`) and close it."""
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`), synced to disk first."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """:func:`atomic_write_text` of ``data`` as indented JSON."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_json(path: str | Path, missing: str) -> Any:
    """The JSON in ``path``; ConfigError with ``missing`` if it does not exist, or saying it is corrupt."""
    from pudding.core.errors import ConfigError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except ValueError as error:
        raise ConfigError(f"{path} is not valid JSON (corrupt or truncated?): {error}") from None


def differing_keys(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ between two run identities (to say why a resume is refused)."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
