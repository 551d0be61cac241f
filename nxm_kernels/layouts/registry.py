"""The layouts by name: ``register_layout`` adds one, ``get_layout`` resolves a name once."""

from __future__ import annotations

from .base import Layout

_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout, *, replace: bool = False) -> Layout:
    """Make ``layout`` known by its name (``layout="..."`` anywhere in the API). Returns it."""
    if not isinstance(layout, Layout) or not layout.name:
        raise TypeError(f"register_layout takes a named Layout instance, got {layout!r}")
    if layout.name in _LAYOUTS and not replace and _LAYOUTS[layout.name] is not layout:
        raise ValueError(f"a layout named {layout.name!r} is already registered (pass replace=True to swap it)")
    _LAYOUTS[layout.name] = layout
    return layout


def unregister_layout(name: str) -> None:
    _LAYOUTS.pop(str(name), None)


def registered_layouts() -> tuple[Layout, ...]:
    """Every registered layout, in registration order."""
    return tuple(_LAYOUTS.values())


def layout_names() -> tuple[str, ...]:
    return tuple(_LAYOUTS)


def get_layout(layout: str | Layout) -> Layout:
    """The Layout object for a name (or the object itself)."""
    if isinstance(layout, Layout):
        return layout
    try:
        return _LAYOUTS[layout]
    except (KeyError, TypeError):
        raise ValueError(f"unknown layout {layout!r}: choose one of {layout_names()}") from None
