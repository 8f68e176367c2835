"""Modes of what mpiinfer creates: the user's umask, as for any file a program writes.

Owns ``user_mode`` and ``apply_user_mode``: temporary files and folders made with ``tempfile`` (0600 / 0700,
whatever the umask) get the mode a plain ``open`` / ``mkdir`` would have given before they are renamed into
place, so outputs, summaries and converted models can be shared by group on a cluster.
"""
from __future__ import annotations

import os


def user_mode(is_dir: bool = False) -> int:
    """0666 (files) or 0777 (folders) less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if is_dir else 0o666) & ~mask


def apply_user_mode(path: str) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the user's mode."""
    if os.path.isdir(path):
        os.chmod(path, user_mode(True))
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), user_mode(True))
            for f in files:
                os.chmod(os.path.join(root, f), user_mode())
    else:
        os.chmod(path, user_mode())


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in ``path``'s folder durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
