"""Atomic checkpoints: write a temporary file beside the target, fsync, rename, fsync the folder.

A crash at any point leaves either the previous checkpoint or the new one, never a
torn file: rename(2) within one folder is atomic, and the fsyncs make the new
bytes durable before the name points at them.

Layout: ``save("ckpt/")`` writes ``ckpt/checkpoint.pt``; a path ending in ``.pt``
or ``.pth`` is the file itself.
"""

from __future__ import annotations

import io
import os
import random
from typing import Any, Dict, Optional

import torch

from dtrain.errors import ConfigError, DataError

FILE_NAME = "checkpoint.pt"
FORMAT = 1


def resolve_file(path: str) -> str:
    """The checkpoint file that `path` names (a folder gets checkpoint.pt inside it)."""
    path = os.fspath(path)
    if path.endswith((".pt", ".pth")):
        return path
    return os.path.join(path, FILE_NAME)


def shard_file(path: str, index: int, count: int) -> str:
    """The file of shard `index` of `count` for the checkpoint `path` names: ckpt/checkpoint.pt ->
    ckpt/checkpoint-shard1-of-4.pt (one per pipeline stage or tensor-parallel rank)."""
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ConfigError(f"shard=({index!r}, {count!r}) must be (index, count) with 0 <= index < count")
    stem, ext = os.path.splitext(resolve_file(path))
    return f"{stem}-shard{index}-of-{count}{ext}"


def check_shard(payload: Dict[str, Any], file: str, shard) -> None:
    saved = payload.get("shard")
    want = tuple(shard) if shard is not None else None
    if (tuple(saved) if saved is not None else None) != want:
        raise ConfigError(f"{file} holds shard {saved} but shard {want} was asked for: load into the layout it "
                          "was saved from (the same pipeline stages / tensor-parallel ranks)")


def atomic_write(target: str, data: bytes) -> None:
    """Writes `data` to `target` so that readers see the old file or the new one, nothing between."""
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    _remove_stale(folder, os.path.basename(target))
    tmp = os.path.join(folder, f".{os.path.basename(target)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(folder: str, name: str) -> None:
    """Deletes temporary files that a writer killed mid-save left behind (its pid is gone)."""
    prefix = f".{name}.tmp-"
    for entry in os.listdir(folder):
        if not entry.startswith(prefix):
            continue
        try:
            pid = int(entry[len(prefix):])
            os.kill(pid, 0)
            continue  # its writer is alive
        except ValueError:
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(folder, entry))
        except FileNotFoundError:
            pass


def rng_state() -> Dict[str, Any]:
    """This process's random generators: torch (CPU and CUDA), Python, NumPy where installed."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
            np.random.set_state(state["numpy"])
        except ImportError:
            pass


def serialize(payload: Dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def deserialize(data: bytes) -> Any:
    """The inverse of serialize()."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def read(path: str) -> Dict[str, Any]:
    """Loads the checkpoint at `path` (a folder or a file). Raises a clear error when absent or damaged."""
    file = resolve_file(path)
    if not os.path.exists(file):
        raise ConfigError(f"no checkpoint at {file!r}: save one first with strategy.save({path!r}, ...), "
                          "or check the path")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise DataError(f"checkpoint {file!r} cannot be read ({type(e).__name__}: {e}); it is damaged or "
                        "not a dtrain checkpoint") from e
    if not isinstance(payload, dict) or payload.get("dtrain_format") != FORMAT:
        raise DataError(f"{file!r} is not a dtrain checkpoint (format {FORMAT}): it has no 'dtrain_format' "
                        "entry; load it with torch.load instead")
    return payload


def restore(payload: Dict[str, Any], rank: int, model: Optional[torch.nn.Module],
            optimizer: Optional[torch.optim.Optimizer], strict: bool = True) -> Dict[str, Any]:
    """Puts the saved states back; returns step and the extra entries."""
    if model is not None:
        if payload.get("model") is None:
            raise ConfigError("the checkpoint holds no model state: it was saved without model=")
        model.load_state_dict(payload["model"], strict=strict)
    if optimizer is not None:
        if payload.get("optimizer") is None:
            raise ConfigError("the checkpoint holds no optimizer state: it was saved without optimizer=")
        optimizer.load_state_dict(payload["optimizer"])
    rngs = payload.get("rng") or []
    if rngs:
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    out = {"step": payload.get("step")}
    out.update(payload.get("extra", {}))
    return out


__all__ = ["atomic_write", "check_shard", "deserialize", "read", "resolve_file", "restore", "rng_state", "serialize",
           "shard_file"]
