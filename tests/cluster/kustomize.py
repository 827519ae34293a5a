"""Renders the Kustomize subset that ``deploy/kubernetes`` uses, with no kubectl or kustomize binary.

Neither ships in a registry these machines reach (Debian's ``kubernetes-client`` is kubectl 1.20,
whose built-in kustomize predates ``replicas`` and ``patches``), and an untested manifest is only a
hope. So the test suite renders the kustomizations here and validates what comes out. The subset,
and nothing more (anything else in a kustomization is refused, so a manifest cannot quietly use a
feature this renderer would skip):

- ``resources``: YAML files (several documents each) and directories holding a kustomization;
- ``namespace``: set on every namespaced object;
- ``images``: ``name`` → ``newName`` / ``newTag`` / ``digest`` in containers and init containers;
- ``replicas``: ``spec.replicas`` of the named Deployment, ReplicaSet or StatefulSet;
- ``configMapGenerator``: ``files`` (``key=path`` or ``path``) and ``literals``, ``behavior``
  ``create`` / ``merge`` / ``replace``, the content hash appended to the name as kustomize does
  (``hasher.go``), and references to the ConfigMap in pod specs renamed to match;
- ``patches``: strategic merge patches from ``path``, applied to the object the patch names or to
  every object that ``target`` (``kind``, ``name``) selects. Lists merge by the Kubernetes merge key
  of their field (containers and env by ``name``, volume mounts by ``mountPath``, …), the patch's
  items first as kustomize orders them; other lists are replaced, and ``null`` deletes a key.

Where kubectl is installed, tests/operations/test_kubernetes_manifests.py renders both overlays
with ``kubectl kustomize`` too and compares the results.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KNOWN_FIELDS = frozenset(
    {"apiVersion", "kind", "resources", "namespace", "images", "replicas", "configMapGenerator", "patches"}
)
# Kinds without a namespace among those the manifests could hold.
CLUSTER_SCOPED = frozenset(
    {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"}
)
SCALABLE = frozenset({"Deployment", "ReplicaSet", "StatefulSet"})
# patchMergeKey of list fields in the Kubernetes API types the manifests patch (by field name).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "envFrom": None,
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}


# Marks a generated ConfigMap with its generator's name while overlays may still merge into it.
GENERATED_FROM = "x-tests-generated-from"


class KustomizeError(ValueError):
    """The kustomization uses something outside the subset, or refers to a missing object."""


def render(directory: str | Path) -> list[Obj]:
    """The objects ``kubectl kustomize DIRECTORY`` would print, in resource order."""
    objects, renames = _build(Path(directory))
    _rename_config_maps(objects, renames)
    for obj in objects:
        annotations = obj["metadata"].get("annotations", {})
        annotations.pop(GENERATED_FROM, None)
        if not annotations:
            obj["metadata"].pop("annotations", None)
    return objects


def _build(directory: Path) -> tuple[list[Obj], dict[str, str]]:
    """Objects and the ConfigMap renames (generator name → hashed name) made at or below here."""
    path = directory / "kustomization.yaml"
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(spec) - KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{path}: fields outside the rendered subset: {sorted(unknown)}")
    objects: list[Obj] = []
    renames: dict[str, str] = {}
    for entry in spec.get("resources", []):
        target = directory / entry
        if target.is_dir():
            found, inner = _build(target)
            objects.extend(found)
            renames.update(inner)
        else:
            objects.extend(d for d in yaml.safe_load_all(target.read_text(encoding="utf-8")) if d)
    for generator in spec.get("configMapGenerator", []):
        _generate(directory, generator, objects, renames)
    for patch in spec.get("patches", []):
        _patch(directory, patch, objects)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for rule in spec.get("replicas", []):
        _scale(rule, objects)
    for rule in spec.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                container["image"] = _retag(container["image"], rule)
    return objects, renames


def _generate(directory: Path, generator: Obj, objects: list[Obj], renames: dict[str, str]) -> None:
    unknown = set(generator) - {"name", "files", "literals", "behavior"}
    if unknown:
        raise KustomizeError(f"configMapGenerator: fields outside the rendered subset: {sorted(unknown)}")
    name = generator["name"]
    data: dict[str, str] = {}
    for item in generator.get("files", []):
        key, _, file = item.partition("=") if "=" in item else (Path(item).name, "", item)
        data[key] = (directory / file).read_text(encoding="utf-8")
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    behavior = generator.get("behavior", "create")
    existing = next((o for o in objects if o["kind"] == "ConfigMap" and _generated_from(o) == name), None)
    if behavior == "create":
        if existing is not None:
            raise KustomizeError(f"configMapGenerator {name}: already generated (use behavior merge/replace)")
        config_map: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        objects.append(config_map)
    elif behavior in ("merge", "replace"):
        if existing is None:
            raise KustomizeError(f"configMapGenerator {name}: nothing to {behavior}")
        config_map = existing
        config_map["data"] = {**config_map["data"], **data} if behavior == "merge" else data
    else:
        raise KustomizeError(f"configMapGenerator {name}: unknown behavior {behavior!r}")
    config_map["metadata"]["name"] = f"{name}-{config_map_hash(config_map['data'])}"
    config_map["metadata"].setdefault("annotations", {})
    config_map["metadata"]["annotations"][GENERATED_FROM] = name
    renames[name] = config_map["metadata"]["name"]


def _generated_from(obj: Obj) -> str | None:
    return obj["metadata"].get("annotations", {}).get(GENERATED_FROM)


def config_map_hash(data: dict[str, str]) -> str:
    """Kustomize's name suffix: SHA-256 of a JSON encoding of the ConfigMap (Go's ``json.Marshal``:
    sorted keys, no spaces, ``<``, ``>`` and ``&`` escaped), its first 10 hex digits with the
    characters that could spell words (0 1 3 a e) swapped for letters. Kustomize 5 (kyaml's
    ``hasher.go``) looks the name up under a path it never finds, so ``name`` is always empty in
    what it hashes: only the data decides the suffix, and so it does here."""
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": ""}, sort_keys=True, separators=(",", ":")
    )
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _patch(directory: Path, patch: Obj, objects: list[Obj]) -> None:
    unknown = set(patch) - {"path", "target"}
    if unknown or "path" not in patch:
        raise KustomizeError(f"patches: only path and target are rendered, got {sorted(patch)}")
    documents = [d for d in yaml.safe_load_all((directory / patch["path"]).read_text(encoding="utf-8")) if d]
    target = patch.get("target")
    if target is not None and (set(target) - {"kind", "name"} or len(documents) != 1):
        raise KustomizeError(f"patches: a target takes kind and name, and one patch document: {patch}")
    for document in documents:
        if not isinstance(document, dict) or "kind" not in document or "metadata" not in document:
            raise KustomizeError(f"patch {patch['path']}: only strategic merge patches are rendered")
        if target is not None:
            chosen = [
                o
                for o in objects
                if o["kind"] == target.get("kind", o["kind"])
                and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
            ]
        else:
            chosen = [
                o
                for o in objects
                if o["kind"] == document["kind"] and o["metadata"]["name"] == document["metadata"]["name"]
            ]
        if not chosen:
            raise KustomizeError(f"patch {patch['path']}: no object matches")
        body = {k: v for k, v in document.items() if k not in ("apiVersion", "kind", "metadata")}
        for obj in chosen:
            merged = strategic_merge(obj, body)
            obj.clear()
            obj.update(merged)


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """The patch over the base: maps merge, keyed lists merge by key, other values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    merge_key = MERGE_KEYS.get(field or "")
    if isinstance(base, list) and isinstance(patch, list) and merge_key is not None:
        # As kustomize orders them: the patch's items (merged into their base item), then the base
        # items the patch did not name.
        named = {item[merge_key] for item in patch}
        by_key = {item.get(merge_key): item for item in base}
        merged_list = [
            strategic_merge(by_key[item[merge_key]], item)
            if item[merge_key] in by_key
            else copy.deepcopy(item)
            for item in patch
        ]
        return merged_list + [copy.deepcopy(item) for item in base if item.get(merge_key) not in named]
    return copy.deepcopy(patch)


def _scale(rule: Obj, objects: list[Obj]) -> None:
    chosen = [o for o in objects if o["kind"] in SCALABLE and o["metadata"]["name"] == rule["name"]]
    if not chosen:
        raise KustomizeError(f"replicas: no Deployment, ReplicaSet or StatefulSet named {rule['name']}")
    for obj in chosen:
        obj["spec"]["replicas"] = rule["count"]


def pod_spec(obj: Obj) -> Obj | None:
    """The pod template's spec of a workload (Deployment, Job, …), or None."""
    template = obj.get("spec", {}).get("template")
    return template.get("spec") if isinstance(template, dict) else None


def _containers(obj: Obj) -> list[Obj]:
    spec = pod_spec(obj) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _retag(image: str, rule: Obj) -> str:
    name, tag, digest = _split_image(image)
    if name != rule["name"]:
        return image
    name = rule.get("newName", name)
    if "digest" in rule:
        return f"{name}@{rule['digest']}"
    if "newTag" in rule:
        return f"{name}:{rule['newTag']}"
    return name + (f"@{digest}" if digest else f":{tag}" if tag else "")


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest or None
    return name, None, digest or None


def _rename_config_maps(objects: list[Obj], renames: dict[str, str]) -> None:
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        refs: list[Obj] = []
        for volume in spec.get("volumes", []):
            refs.extend([volume["configMap"]] if "configMap" in volume else [])
            refs.extend(
                s["configMap"] for s in volume.get("projected", {}).get("sources", []) if "configMap" in s
            )
        for container in _containers(obj):
            refs.extend(e["configMapRef"] for e in container.get("envFrom", []) if "configMapRef" in e)
            refs.extend(
                e["valueFrom"]["configMapKeyRef"]
                for e in container.get("env", [])
                if "configMapKeyRef" in e.get("valueFrom", {})
            )
        for ref in refs:
            ref["name"] = renames.get(ref["name"], ref["name"])
