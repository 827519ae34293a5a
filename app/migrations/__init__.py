"""Alembic's migrations, a package so that import-linter reads them.

Alembic loads ``env.py`` and ``versions/`` by path (``app/db/migrate.py``, ``alembic.ini``).
``env.py`` is an entry point like ``__main__``: it may read the runtime's settings (for the
bare ``alembic`` command line), and nothing in the gateway imports it.
"""
