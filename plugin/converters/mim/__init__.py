"""MIM sessions: unpack the RTSTRUCT and REG objects MIM stores inside Raw Data objects (``rtharvest-convert mim``)."""

from .session import (
    KEPT_SOP_CLASSES,
    MimSessionError,
    SkippedItem,
    UnpackedObject,
    UnpackResult,
    is_mim_session,
    session_items,
    unpack,
    unpack_bytes,
    unresolved_references,
)

__all__ = [
    "KEPT_SOP_CLASSES",
    "MimSessionError",
    "SkippedItem",
    "UnpackResult",
    "UnpackedObject",
    "is_mim_session",
    "session_items",
    "unpack",
    "unpack_bytes",
    "unresolved_references",
]
