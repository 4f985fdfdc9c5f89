"""JAX's persistent compilation cache, on by default for jreml (README, "Compilation").

A first fit of a model structure in a process spends seconds compiling XLA programs that a later process would
compile again identically. With the persistent cache, a later process loads them from disk instead. On import,
jreml points JAX's cache at a folder of the platform's user cache directory, one per JAX/jaxlib version:

    Linux ``$XDG_CACHE_HOME/jreml/xla/<jax>-<jaxlib>`` (default ``~/.cache/jreml/xla/...``),
    macOS ``~/Library/Caches/jreml/xla/...``, Windows ``%LOCALAPPDATA%\\jreml\\Cache\\xla\\...``.

JAX's cache key already holds the jaxlib version; the version folder also keeps a new JAX from sharing (and
growing) an old one's folder: an old version's folder can be deleted as a whole.

- ``JREML_CACHE_DIR=off`` (or ``0``, ``none``, empty) leaves JAX's cache as it is (off unless configured);
  ``JREML_CACHE_DIR=PATH`` moves it to ``PATH/<jax>-<jaxlib>``.
- A cache the user configured wins: ``JAX_COMPILATION_CACHE_DIR`` in the environment, or
  ``jax.config.jax_compilation_cache_dir`` set before ``import jreml``; so does a user's
  ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``.
- Only programs that took at least ``MIN_COMPILE_TIME_SECS`` to compile are written (JAX's default is 1 s,
  which leaves out many fitting programs of small models), so eager one-op programs do not fill the folder.
- Set before the first compilation: JAX reads the setting once, when it first compiles. If the process compiled
  something before ``import jreml`` with the cache unset, JAX's cache state is reset so the setting applies.
- An unwritable folder only costs compile time (the cache is then left off).
"""

from __future__ import annotations

import os
import sys

import jax

#: ``JREML_CACHE_DIR`` values that turn the cache off.
OFF = frozenset({"off", "0", "none", "false", ""})
#: Programs compiled in less than this many seconds are not written to the cache.
MIN_COMPILE_TIME_SECS = 0.2
_ENV = "JREML_CACHE_DIR"


def user_cache_root() -> str:
    """The platform's user cache directory for jreml (without the ``xla/<version>`` part)."""
    home = os.path.expanduser("~")
    if sys.platform == "darwin":
        return os.path.join(home, "Library", "Caches", "jreml")
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
        return os.path.join(base, "jreml", "Cache")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return os.path.join(base, "jreml")


def version_folder() -> str:
    """``<jax version>-<jaxlib version>``: a new JAX never loads (or grows) an older one's entries."""
    import jaxlib

    return f"{jax.__version__}-{jaxlib.__version__}"


def default_cache_dir() -> str | None:
    """The folder jreml uses for JAX's cache, from ``JREML_CACHE_DIR`` or the platform default; None if off."""
    setting = os.environ.get(_ENV)
    if setting is not None and setting.strip().lower() in OFF:
        return None
    root = os.path.join(user_cache_root(), "xla") if setting is None else os.path.expanduser(setting)
    return os.path.join(root, version_folder())


def _user_configured() -> bool:
    return bool(os.environ.get("JAX_COMPILATION_CACHE_DIR")) or jax.config.jax_compilation_cache_dir is not None


def enable_default_cache() -> str | None:
    """Point JAX's persistent compilation cache at ``default_cache_dir()`` unless the user configured one or
    turned it off. Returns the folder set, or None if nothing was changed."""
    if _user_configured():
        return None
    folder = default_cache_dir()
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None  # an unwritable home directory only costs compile time
    if not os.access(folder, os.W_OK):
        return None
    from jax._src import compilation_cache

    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    if getattr(compilation_cache, "_cache_checked", False):
        compilation_cache.reset_cache()  # JAX compiled before jreml was imported, with no cache: read it again
    return folder
