"""The public surface is exactly ``signedqueue.__all__``."""

from __future__ import annotations

import signedqueue


def test_all_is_sorted_and_complete() -> None:
    """Every public name in the package namespace is in __all__, and vice versa."""
    public = {
        name
        for name, value in vars(signedqueue).items()
        if not name.startswith("_") and not isinstance(value, type(signedqueue))
        and name != "annotations"
    }
    assert sorted(signedqueue.__all__) == sorted(public)


def test_every_exported_name_resolves() -> None:
    """Each name in __all__ is importable from the package."""
    for name in signedqueue.__all__:
        assert getattr(signedqueue, name) is not None


def test_version_comes_from_metadata() -> None:
    """__version__ is read from the installed distribution."""
    from importlib.metadata import version

    assert version("signedqueue") == signedqueue.__version__
