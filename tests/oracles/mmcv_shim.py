"""Make mmcv 1.x importable on CPU when it was built without its compiled ops.

The oracle venv installs ``mmcv==1.7.2`` with ``MMCV_WITH_OPS=0``, so the extension module
``mmcv._ext`` does not exist. Every file under ``mmcv.ops`` calls
``mmcv.utils.ext_loader.load_ext(name, funcs)`` at import time, which fails, and mmdet's
Mask2Former (``MultiScaleDeformableAttention``) imports ``mmcv.ops``.

``install()`` wraps ``load_ext`` so that, when the real extension cannot be imported, it
returns a stand-in module whose kernels raise a clear error if they are ever called. On CPU
tensors ``MultiScaleDeformableAttention.forward`` never calls its kernel: it takes the
pure-PyTorch path ``multi_scale_deformable_attn_pytorch`` (grid_sample), which is what the
oracles rely on. Calling ``install()`` more than once is harmless.

Usage (before anything imports ``mmcv.ops``, mmdet or ModelScope's mmdet-based models)::

    from mmcv_shim import install
    install()
"""
from __future__ import annotations

import importlib.util
import sys
import types

__all__ = ['install', 'is_installed', 'has_compiled_ops', 'MissingKernelError']

_MARKER = '_oracle_stand_in'


class MissingKernelError(RuntimeError):
    """Raised when code calls a compiled mmcv kernel that this build does not have."""


def has_compiled_ops() -> bool:
    """True when mmcv was built with its extension (then no stand-in is needed)."""
    try:
        return importlib.util.find_spec('mmcv._ext') is not None
    except (ImportError, ValueError):
        return False


class _StandInExtension(types.ModuleType):
    """Plays the role of ``mmcv._ext``: every requested kernel raises when called."""

    def __init__(self, name: str, funcs):
        super().__init__(f'mmcv.{name} (stand-in, no compiled ops)')
        self.requested = tuple(funcs)
        for func_name in self.requested:
            setattr(self, func_name, self._missing(func_name))

    @staticmethod
    def _missing(func_name: str):
        def kernel(*args, **kwargs):
            raise MissingKernelError(
                f'mmcv was built without compiled ops (MMCV_WITH_OPS=0); kernel '
                f'{func_name!r} is unavailable. Run the oracle on CPU tensors so that '
                f'mmcv takes its pure-PyTorch path.')

        kernel.__name__ = func_name
        return kernel

    def __getattr__(self, attr: str):
        # Kernels looked up later than load_ext() (not listed in ``funcs``).
        if attr.startswith('__'):
            raise AttributeError(attr)
        return self._missing(attr)


def is_installed() -> bool:
    ext_loader = sys.modules.get('mmcv.utils.ext_loader')
    return ext_loader is not None and getattr(ext_loader.load_ext, _MARKER, False)


def install() -> None:
    """Replace ``mmcv.utils.ext_loader.load_ext`` with a stand-in-returning wrapper.

    Must run before the first ``import mmcv.ops``; raises if mmcv.ops is already imported
    without the shim (that import would have failed or bound the real extension).
    """
    if is_installed():
        return
    if 'mmcv.ops' in sys.modules and not has_compiled_ops():
        raise RuntimeError('mmcv.ops was imported before mmcv_shim.install()')

    from mmcv.utils import ext_loader

    original_load_ext = ext_loader.load_ext

    def load_ext(name, funcs):
        try:
            return original_load_ext(name, funcs)
        except ImportError:
            # ModuleNotFoundError is an ImportError: mmcv._ext is absent.
            return _StandInExtension(name, funcs)

    setattr(load_ext, _MARKER, True)
    load_ext.__doc__ = 'mmcv load_ext that falls back to a stand-in (tests/oracles/mmcv_shim.py).'
    ext_loader.load_ext = load_ext
