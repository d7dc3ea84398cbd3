"""The one way the workbench deletes files: only regular files, only inside a folder's real directory,
never through a symbolic link.

A run folder is user data that others can shape (a shared run, a downloaded one, a link put there by
mistake): a table or analyses folder that is a link to `~/` must never turn a cleanup into deleting the
user's files. Every removal therefore walks from the root's real directory one component at a time with
`O_NOFOLLOW` directory descriptors and unlinks by name relative to the last one (`unlinkat`), so a link
anywhere on the way, or swapped in while we walk, stops the removal instead of being followed. Links,
FIFOs, sockets and devices are never removed; a folder is removed only once empty.

`link_out` and `refuse_links_out` find the links a reader would follow out of a run, so that a run
holding them is refused in one sentence before anything reads or writes through them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

from .errors import WorkbenchError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class LinkedRun(WorkbenchError):
    """A run folder whose tables or analyses are symbolic links leading out of it."""


def _parts(root: Path, path) -> tuple[str, ...] | None:
    """`path` (relative to root, or absolute under it) as plain name components, or None when it is
    not a plain path below root (absolute elsewhere, '..', empty)."""
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.relative_to(root)
        except ValueError:
            try:
                p = Path(os.path.abspath(p)).relative_to(os.path.realpath(root))
            except ValueError:
                return None
    parts = tuple(x for x in p.parts if x not in ("", "."))
    if not parts or any(x == ".." or "/" in x for x in parts):
        return None
    return parts


def _open_dir(root: Path, names: tuple[str, ...]) -> int | None:
    """A descriptor of root's real directory / names..., walked without following any link; None if a
    component is a link, not a folder, or missing."""
    try:
        fd = os.open(os.path.realpath(root), _DIR_FLAGS)
    except OSError:
        return None
    for name in names:
        try:
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError:  # ELOOP/ENOTDIR: a link or a file; ENOENT: gone
            os.close(fd)
            return None
        os.close(fd)
        fd = nfd
    return fd


def remove_file(root, path) -> bool:
    """Delete `path` (relative to `root`) if it is a regular file reached from root's real directory
    without following a link. Returns whether a file was removed; anything else is left as it is."""
    root = Path(root)
    parts = _parts(root, path)
    if parts is None:
        return False
    fd = _open_dir(root, parts[:-1])
    if fd is None:
        return False
    try:
        st = os.lstat(parts[-1], dir_fd=fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        os.unlink(parts[-1], dir_fd=fd)  # unlink never follows a link: at worst it removes a swapped-in link
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_tree(root, path, keep: Callable[[str], bool] | None = None) -> bool:
    """Remove the folder `path` (relative to `root`) that the workbench created: its regular files (those
    `keep(name)` does not protect), then its sub-folders once empty, then itself once empty. Links are
    neither followed nor removed, so a folder holding one stays. Returns whether the folder is gone."""
    root = Path(root)
    parts = _parts(root, path)
    if parts is None:
        return False
    parent = _open_dir(root, parts[:-1])
    if parent is None:
        return False
    try:
        try:
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError:
            return False
        try:
            _empty(fd, keep)
        finally:
            os.close(fd)
        try:
            os.rmdir(parts[-1], dir_fd=parent)
            return True
        except OSError:
            return False
    finally:
        os.close(parent)


def _empty(fd: int, keep) -> None:
    for entry in list(os.scandir(fd)):
        name = entry.name
        try:
            st = os.lstat(name, dir_fd=fd)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue
            try:
                _empty(sub, keep)
            finally:
                os.close(sub)
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError:
                pass
        elif stat.S_ISREG(st.st_mode) and not (keep is not None and keep(name)):
            try:
                os.unlink(name, dir_fd=fd)
            except OSError:
                pass


def is_inside(path, root) -> bool:
    """Whether `path`'s real location is root's real directory or below it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def link_out(root, path) -> str | None:
    """The first component of `path` (relative to root) that is a link whose target lies outside root's
    real directory, as 'NAME -> TARGET', or None. Links that stay inside the run are not reported."""
    root = Path(root)
    parts = _parts(root, path)
    if parts is None:
        return None
    cur = root
    for name in parts:
        cur = cur / name
        try:
            if not stat.S_ISLNK(os.lstat(cur).st_mode):
                continue
        except OSError:
            return None
        if not is_inside(cur, root):
            return f"{cur.relative_to(root)} -> {os.path.realpath(cur)}"
    return None


def refuse_links_out(root, names) -> None:
    """Raise LinkedRun (one sentence) when any of `names` (folders or files relative to root) is, or
    passes through, a link leading out of the run folder."""
    for name in names:
        bad = link_out(root, name)
        if bad:
            raise LinkedRun(f"run {root} is refused: {bad} is a symbolic link out of the run folder; the workbench "
                            "reads, writes and deletes only inside a run's own folder (copy the data in instead)")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's included)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
