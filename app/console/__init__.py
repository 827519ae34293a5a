"""The web console's framework-free parts: sessions, page queries, charts, thumbnails.

The pages themselves (FastAPI routes, templates, static files) live in ``app/api/console``.
"""
