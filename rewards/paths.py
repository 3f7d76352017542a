"""Names that come from outside (a server request) may only point inside an operator's directory."""

from __future__ import annotations

from pathlib import Path


def resolve_inside(name: str | Path, root: str | Path) -> Path | None:
    """`name` resolved against `root` (relative names are taken from there), or None when it lands outside.

    Resolving first follows `..` and symbolic links, so neither can lead out of `root`.
    """
    base = Path(root).expanduser().resolve()
    path = Path(name).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    return path if path.is_relative_to(base) else None
