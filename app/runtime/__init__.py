"""One running gateway, from its settings to its shutdown.

``settings.py`` assembles the config sections each package owns; ``lifespan.py`` opens every
resource into the per-app container the routes read (``state.py``) and closes them;
``drain.py`` is SIGTERM's two steps; ``standalone.py`` the task worker in its own process;
``cli.py`` the database commands. ``app/main.py`` composes this with the routes.
"""
