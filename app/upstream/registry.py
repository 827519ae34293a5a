"""Build providers from settings, one per configured upstream, and index them by model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from app.domain.catalog import Catalog
from app.upstream.base import ImageProvider
from app.upstream.config import UpstreamSettings, provider_kind, provider_kinds
from app.upstream.slots import SlotPolicy
from app.upstream.transport import Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    """One way to serve a model: which provider, under which upstream model name."""

    provider: ImageProvider
    upstream_model: str
    weight: int
    priority: int
    # False for upstreams that cannot stream: the router asks them for a whole result instead.
    streams: bool = True
    # True for upstreams that stop serving a model on OpenAI's retirement date.
    follows_retirements: bool = False

    @property
    def name(self) -> str:
        return self.provider.name


class ProviderRegistry:
    def __init__(
        self,
        routes: dict[str, list[Route]],
        providers: Sequence[ImageProvider],
        limits: dict[str, int | None] | None = None,
        slot_policies: dict[str, SlotPolicy] | None = None,
    ) -> None:
        self._routes = routes
        self._providers = list(providers)
        self._limits = limits or {}
        self._slot_policies = slot_policies or {}

    def concurrency_limits(self) -> dict[str, int | None]:
        """Each upstream's ``max_concurrency`` (None: unbounded)."""
        return dict(self._limits)

    def slot_policy(self, name: str) -> SlotPolicy:
        """How calls to ``name`` wait for a slot (its cap, how long, what to answer then)."""
        return self._slot_policies.get(name) or SlotPolicy(limit=self._limits.get(name))

    def models(self) -> list[str]:
        """Public models at least one active upstream serves."""
        return [model for model, routes in self._routes.items() if routes]

    def routes(self, model: str, *, retired: bool = False) -> list[Route]:
        """The routes of a model; for a retired one, only upstreams that still serve it."""
        routes = self._routes.get(model, ())
        return [r for r in routes if not (retired and r.follows_retirements)]

    def providers(self) -> list[ImageProvider]:
        return list(self._providers)

    def provider_names(self) -> list[str]:
        return [p.name for p in self._providers]

    async def aclose(self) -> None:
        for provider in self._providers:
            await provider.aclose()

    @classmethod
    def build(
        cls, upstreams: Sequence[UpstreamSettings], catalog: Catalog, *, secrets: Sequence[str] = ()
    ) -> ProviderRegistry:
        """``secrets``: the gateway's other configured secrets (admin key, …), scrubbed from every
        upstream's messages as every upstream's key is, in part or whole."""
        routes: dict[str, list[Route]] = {name: [] for name in catalog.names()}
        _check_catalog_kinds(catalog)
        # Which routes are the built-in renderer's, and for which models it may stand in.
        local_routes: dict[str, list[tuple[Route, UpstreamSettings]]] = {}
        providers: list[ImageProvider] = []
        limits: dict[str, int | None] = {}
        policies: dict[str, SlotPolicy] = {}
        for upstream in upstreams:
            if not upstream.active:
                log.info(
                    "upstream skipped: disabled or without api_key",
                    extra={"fields": {"upstream": upstream.name}},
                )
                continue
            kind = provider_kind(upstream.kind)
            provider = kind.build(upstream)
            providers.append(provider)
            limits[upstream.name] = upstream.max_concurrency
            policies[upstream.name] = SlotPolicy(
                upstream.max_concurrency, upstream.queue_timeout_s, upstream.busy_status
            )
            for model, upstream_model in _with_aliases(
                upstream.model_map(_servable(upstream, catalog)), catalog
            ).items():
                if model not in routes:
                    log.warning(
                        "upstream lists a model missing from the catalog; ignored",
                        extra={"fields": {"upstream": upstream.name, "model": model}},
                    )
                    continue
                caps = catalog.get(model)
                spec = caps.provider if caps is not None else None
                if kind.serves == "catalog":
                    if spec is None or spec.kind != upstream.kind:
                        log.warning(
                            "upstream lists a model of another provider; ignored",
                            extra={"fields": {"upstream": upstream.name, "model": model}},
                        )
                        continue
                    if upstream_model == model:
                        upstream_model = spec.model  # the catalog names the provider's model id
                route = Route(
                    provider,
                    upstream_model,
                    upstream.weight,
                    upstream.priority,
                    upstream.stream,
                    follows_retirements=upstream.follows_openai_retirements,
                )
                routes[model].append(route)
                if kind.stand_in:
                    local_routes.setdefault(model, []).append((route, upstream))
        _no_silent_stand_in(routes, local_routes)
        keys = [u.api_key.get_secret_value() for u in upstreams if u.api_key is not None]
        _scrub_everywhere(providers, (*keys, *secrets))
        return cls(routes, providers, limits, policies)


def _no_silent_stand_in(
    routes: dict[str, list[Route]], local_routes: dict[str, list[tuple[Route, UpstreamSettings]]]
) -> None:
    """`local` draws placeholders: it serves a model only when no real upstream is active for it,
    or when the operator named the model in its ``fallback_for`` (SPEC §2). A model a real upstream
    has retired is not handed to `local` either: its real route still counts here, so the client
    gets the upstream's refusal, never a placeholder at the real model's price."""
    for model, pairs in local_routes.items():
        local = {id(route) for route, _ in pairs}
        if all(id(route) in local for route in routes[model]):
            continue  # only the renderer serves this model: a fresh machine, no provider key
        dropped = {id(route) for route, upstream in pairs if not upstream.stands_in_for(model)}
        routes[model] = [route for route in routes[model] if id(route) not in dropped]


def _servable(upstream: UpstreamSettings, catalog: Catalog) -> list[str]:
    """What ``"*"`` stands for on this upstream (``ProviderKind.serves``): every model for the
    stand-in; a provider's own models for its kind; the models of no provider for
    OpenAI-compatible kinds."""
    serves = provider_kind(upstream.kind).serves
    if serves == "all":
        return catalog.names()
    names = []
    for name in catalog.names():
        caps = catalog.get(name)
        kind = caps.provider.kind if caps is not None and caps.provider is not None else None
        if kind == upstream.kind or (kind is None and serves == "unclaimed"):
            names.append(name)
    return names


def _with_aliases(mapping: dict[str, str], catalog: Catalog) -> dict[str, str]:
    """An upstream that serves a model serves its dated snapshots too: under the snapshot's own
    name, or under the model's rename when the upstream renames it (an Azure deployment)."""
    full = dict(mapping)
    for name in catalog.names():
        caps = catalog.get(name)
        if caps is None or caps.alias_of is None or name in full or caps.alias_of not in mapping:
            continue
        renamed = mapping[caps.alias_of]
        full[name] = name if renamed == caps.alias_of else renamed
    return full


def _check_catalog_kinds(catalog: Catalog) -> None:
    """A catalog model whose ``provider.kind`` no adapter registers could never be served: refused
    at startup, naming the field, rather than left as a model that is silently missing. (The
    catalog sits below the adapters and cannot know their kinds; this is where both meet.)"""
    known = provider_kinds()
    for name in catalog.names():
        caps = catalog.get(name)
        if caps is not None and caps.provider is not None and caps.provider.kind not in known:
            raise ValueError(
                f"models.{name}.provider.kind: {caps.provider.kind!r} is not an upstream kind "
                f"(one of {', '.join(sorted(known))})"
            )


def _scrub_everywhere(providers: Sequence[ImageProvider], secrets: Sequence[str]) -> None:
    """Each provider scrubs its own key, base URL and host; this adds every configured secret, so
    an upstream that echoes another's key (a shared proxy, a copied config) cannot leak it. The
    providers that relay upstream text do it through their ``Transport`` (`local` relays none)."""
    extra = [s for s in secrets if s]
    for provider in providers:
        transport = getattr(provider, "_transport", None)
        if isinstance(transport, Transport):
            transport.scrub_also([s for s in extra if s not in transport.secrets])
