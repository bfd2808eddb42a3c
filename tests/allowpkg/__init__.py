"""
An importable package for the allowlist and attack tests.

It lives under ``tests/`` and is imported as ``allowpkg``: ``tests/`` has no
``__init__.py``, so pytest's default ``prepend`` import mode puts ``tests/`` on
``sys.path`` to import the test modules, and child processes started with
spawn or forkserver inherit that ``sys.path`` from the parent.  Pickles name
its globals as ``allowpkg.mod.Point`` and so on.

Layout:

* ``allowpkg.mod``: a package defining classes and a function, that also
  imports a module, a dangerous function under an innocent name, a class from
  a sibling module, and has a submodule;
* ``allowpkg.mod.sub``: that submodule;
* ``allowpkg.mod_evil``: a module whose name starts with ``mod``;
* ``allowpkg.other``: a sibling module whose class ``mod`` imports.
"""
