"""Reading published checkpoints safely and strictly, and naming their content for the cache.

* :func:`load_state_dict_file` reads ``.pt``/``.pth``/``.bin`` files with
  ``torch.load(weights_only=True)``, which cannot run code; a file that needs full unpickling is
  refused unless the user passes ``trust_checkpoint=True``. Safetensors and TorchScript archives
  (OpenAI's original CLIP files) hold no pickled code and load directly.
  :func:`safe_torch_load` is that rule on its own; the model's Lightning checkpoints use it too.
* :func:`load_strict` loads a state dict into a module and turns every missing, unexpected or
  misshaped key into a :class:`~macsc.errors.CheckpointError` that names it.
* :func:`file_digest` hashes a file's content once per (path, size, mtime): checkpoint-backed
  extractors put it in their identity, so the prototype cache notices a replaced file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from macsc.errors import CheckpointError, first_line

_DIGESTS: dict[tuple[str, int, int], str] = {}


def checkpoint_path(value: str | os.PathLike, *, kind: str, hint: str) -> Path:
    """``value`` as an existing file, or a CheckpointError that says where to get one."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"{kind} prototype extractor: checkpoint file {str(path)!r} does not exist; {hint}"
        )
    return path


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, memoised by (resolved path, size, mtime)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    memo_key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[memo_key] = digest.hexdigest()
    return _DIGESTS[memo_key]


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _read(path: Path, trust_checkpoint: bool) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    return safe_torch_load(
        path,
        trusted=trust_checkpoint,
        how_to_trust="pass the extractor option trust_checkpoint=True",
    )


def safe_torch_load(
    path: str | os.PathLike,
    *,
    trusted: bool = False,
    how_to_trust: str,
    map_location: Any = "cpu",
    mmap: bool = False,
) -> Any:
    """``torch.load`` that cannot run code from the file unless ``trusted``.

    A file that needs full unpickling (a pickled class, a lambda: anything besides tensors and
    plain containers) is refused with a :class:`CheckpointError` whose message ends with
    ``how_to_trust``, the option that lets a user who trusts the source load it anyway. A
    damaged or truncated file is a CheckpointError too, and so is a folder or a file that is
    no checkpoint at all (a YAML or text file), named as what it is.
    """
    not_a_checkpoint = describe_non_checkpoint(path)
    if not_a_checkpoint:
        raise CheckpointError(f"checkpoint {str(path)!r} {not_a_checkpoint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if not trusted:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds Python objects besides tensors, and loading them "
                f"would run code from the file; if you trust its source, {how_to_trust}"
            ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({first_line(error)}); is the download "
            "complete?"
        ) from error
    return torch.load(path, map_location=map_location, weights_only=False)


def describe_non_checkpoint(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a PyTorch checkpoint (a folder, a text file, ...), or None when
    it may be one: ``torch.save`` writes a zip archive (or, in the legacy format, a pickle,
    which starts with the byte 0x80)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.ckpt"))[:4]
        inside = f" (it holds {found})" if found else ""
        return f"is a folder, not a checkpoint file{inside}; give the path of one .ckpt file"
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        head = handle.read(512)
    if not head:
        return "is an empty file, not a checkpoint; is the download or save complete?"
    if head.startswith((b"PK\x03\x04", b"\x80")) or zipfile.is_zipfile(path):
        return None
    try:
        first = head.decode("utf-8").strip().splitlines()[0][:60]
    except (UnicodeDecodeError, IndexError):
        return "is not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    kind = "a YAML file" if path.suffix in (".yaml", ".yml") else "a text file"
    return f"is {kind} (it starts {first!r}), not a PyTorch checkpoint; give a .ckpt file"


def load_state_dict_file(path: Path, *, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """The flat tensor state dict stored in ``path``.

    Unwraps the usual containers (``{"state_dict": ...}``, ``{"model": ...}``) and strips a
    DistributedDataParallel ``module.`` prefix, the one normalising step before a strict load.
    """
    content = _read(path, trust_checkpoint)
    for wrapper in ("state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(wrapper), dict):
            content = content[wrapper]
    if not isinstance(content, dict) or not content:
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    state = {}
    for key, value in content.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: entry {key!r} is a {type(value).__name__}, not a "
                "tensor; this is not a plain state dict"
            )
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    return state


def block_count(keys: list[str] | dict[str, Any], prefix: str) -> int:
    """How many numbered blocks ``prefix<N>.`` the keys hold (0 when none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(match.group(1)) for key in keys if (match := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def require_keys(
    state: dict[str, Tensor],
    keys: list[str],
    *,
    source: Path,
    layout: str,
    stray: list[str] = (),
) -> None:
    """A CheckpointError naming the first key of ``keys`` that ``state`` lacks (and the
    ``stray`` keys that fit nowhere, which are often the same key renamed)."""
    for key in keys:
        if key not in state:
            extra = f"; keys that fit nowhere: {sorted(stray)[:8]}" if stray else ""
            raise CheckpointError(
                f"checkpoint {str(source)!r} has no key {key!r}, so it is not a {layout} "
                f"checkpoint (or its keys were renamed){extra}"
            )


def state_dict_mismatch(
    expected: dict[str, Tensor], state: dict[str, Any], *, keys: bool = True
) -> list[str]:
    """What keeps ``state`` from loading into a module whose state dict is ``expected``: one
    phrase each for missing, unexpected (when ``keys``) and misshaped keys, eight keys at most,
    so an error message stays readable; empty when it fits."""
    misshaped = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in sorted(set(state) & set(expected))
        if isinstance(state[key], Tensor) and state[key].shape != expected[key].shape
    ]
    problems = []
    if keys and (missing := sorted(set(expected) - set(state))):
        problems.append(f"missing keys {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
    if keys and (unexpected := sorted(set(state) - set(expected))):
        problems.append(
            f"unexpected keys {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else "")
        )
    if misshaped:
        problems.append(f"wrong shapes {misshaped[:8]}" + (" ..." if len(misshaped) > 8 else ""))
    return problems


def load_strict(module: nn.Module, state: dict[str, Tensor], *, source: Path, layout: str) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or misshaped key is an error."""
    problems = state_dict_mismatch(module.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"checkpoint {str(source)!r} does not match the {layout} layout: "
            + "; ".join(problems)
            + ". Is this the right file for this extractor kind?"
        )
    module.load_state_dict(state, strict=True)
