"""Admission's validation step: a client's draft becomes an ``ImageJob``, or an OpenAI-shaped
400/403/404, before anything is reserved or called.

The entry point is ``JobPreparer.validate`` (``preparation.py``), which ``ImageService.admit``
(``app/images/service.py``) runs before moderation, the rate limits and the hold. The rest is
what it consults: the request path's types (``requests.py``: drafts, admissions, outcomes),
the catalog's rules (``validation.py``, ``output_rules.py`` for GIF/SVG) and the models'
lifecycle (``lifecycle.py``: retirements, remaps, Sunset headers).
"""
