"""Lifetime of a native handle shared by Model and Trainer."""
import functools
import weakref

from . import _lib
from .errors import GraftError


def locked(method):
    """Runs a method under the object's lock: the C ABI allows one thread at a time per model handle."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class NativeHandle:
    """Owns one library handle: freed by close(), by a `with` block, or when garbage-collected."""

    _kind = "handle"

    def _adopt(self, handle, free):
        self._handle = handle
        self._finalizer = weakref.finalize(self, free, handle)

    @locked
    def close(self):
        """Frees the handle now (idempotent)."""
        self._finalizer()
        self._handle = None

    @property
    def closed(self):
        """True after close()."""
        return not self._finalizer.alive

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _h(self, where):
        if not self._finalizer.alive:
            raise GraftError(_lib.ERR_STATE, f"the {self._kind} is closed", where)
        return self._handle
