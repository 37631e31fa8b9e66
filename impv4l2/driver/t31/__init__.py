"""The ``t31`` backend: Ingenic T31 ISP, frame channels and AVPU through libimp.so."""

from .libimp import T31Error

__all__ = ["T31Error", "T31Backend"]


def __getattr__(name: str):
    if name == "T31Backend":  # lazy: importing the package must not load libimp
        from .backend import T31Backend
        return T31Backend
    raise AttributeError(name)
