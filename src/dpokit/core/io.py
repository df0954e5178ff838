"""Small shared helpers: atomic writes that honour the user's umask."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask. Linux shows it in /proc/self/status; elsewhere set-and-restore (not thread-safe, brief)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_as_created(path: str | os.PathLike) -> None:
    """Give a file or folder from mkstemp/mkdtemp (always 0600/0700) the mode a plain open()/mkdir() would give:
    0666/0777 minus the umask, so a colleague or a web server can read what dpokit writes under umask 022."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def chmod_tree_as_created(root: str | os.PathLike) -> None:
    """chmod_as_created on every file and folder under root (root included).

    Workaround: safetensors >= 0.8.1 writes through a temporary file created 0600 and renames it, ignoring the
    umask (safetensors issue #782; fix proposed in PR #789), so model.safetensors comes out owner-only while every
    other file is 0644. Call after a save_pretrained; remove once safetensors honours the umask again.
    """
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            chmod_as_created(path)


def make_temp_dir(target: str | os.PathLike) -> Path:
    """A temporary sibling folder of `target`, to fill and then rename onto it (atomic publish)."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    chmod_as_created(tmp)
    return tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        chmod_as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def image_data_uri(path: str | os.PathLike, max_px: int) -> str:
    """An image file as a `data:` URI, scaled down to at most `max_px` a side (a report's thumbnail, the label
    page's picture): PNG for small images (lossless, tiny), JPEG for photos. Raises OSError / ValueError (PIL's
    UnidentifiedImageError is an OSError) when the file cannot be read as an image."""
    import base64
    import io

    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    small = img.width * img.height <= 128 * 128
    img.save(buf, format="PNG" if small else "JPEG", **({} if small else {"quality": 85}))
    return f"data:image/{'png' if small else 'jpeg'};base64," + base64.b64encode(buf.getvalue()).decode()
