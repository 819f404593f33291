"""DALI-style functional API: ``dali_rehearsal.fn.rehearsal(source, buffer=...)``."""

from .stage import rehearsal

__all__ = ["rehearsal"]
