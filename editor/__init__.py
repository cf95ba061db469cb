"""COMEBA-HK consecutive batch model editing with hook layers.

Public entry points: :func:`editor.loading.load_model`, :class:`editor.model.EditableModel`,
:func:`editor.stats.key_stats`, :func:`editor.step.compute_delta` and :func:`editor.step.apply_delta`.
This package never imports ``kb`` or ``daemon``.
"""

from .kernel_caches import bound_kernel_caches

bound_kernel_caches()     # before any kernel runs: oneDNN and ideep read it once (editor/kernel_caches.py)
