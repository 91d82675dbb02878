"""Detector registry: built-in detectors by name, plug-ins through Python entry points.

A *detector* is any object with the :class:`Detector` interface::

    predict(hu, geometry, *, series_uid) -> lidc_det.results.Detections
    fit(train_cases, val_cases, out_dir)          # optional

Register a factory (a class or a function returning a detector) by name::

    from stage1_detect.registry import register_detector

    @register_detector("my-detector")
    class MyDetector:
        def __init__(self, threshold: float = 0.5) -> None: ...
        def predict(self, hu, geometry, *, series_uid): ...

and build it from a name or a config mapping: ``build_detector("my-detector")`` or
``build_detector({"name": "my-detector", "threshold": 0.3})`` (the other keys are
passed to the factory as keyword arguments).

**Plug-ins.** An outside package registers without editing this repository by
declaring an entry point in the group ``lidc_det.detectors``; the entry point's
name is the detector name and its object the factory. In ``setup.cfg``::

    [options.entry_points]
    lidc_det.detectors =
        my-detector = my_package.detector:MyDetector

(``pyproject.toml``: ``[project.entry-points."lidc_det.detectors"]``). Entry points
are only imported when their detector is built.

Names are unique: registering a name twice, or a plug-in whose name is taken by
a built-in or by another plug-in, raises :class:`DuplicateDetectorError`.

This is a small registry of our own rather than mmengine's ``Registry``: it
needs no import of mmengine (so ``lidc-det --help`` and ``import stage1_detect``
stay fast), its errors name the clashing entry point and distribution, and the
mmdet adapter can still build its mmdet model through mmdet's own registries
inside its factory.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections

ENTRY_POINT_GROUP = "lidc_det.detectors"

#: Modules that register the built-in detectors when imported (imported on first use).
BUILTIN_MODULES: tuple[str, ...] = (
    "stage1_detect.detector",
    "stage1_detect.ensemble",
    "stage1_detect.monai_baseline",
    "stage1_detect.mmdet_adapter",
    "stage1_detect.blob",
    "stage1_detect.blob_cnn",
)

DetectorFactory = Callable[..., Any]


@runtime_checkable
class Detector(Protocol):
    """What the benchmark and the pipeline need from a detector."""

    def predict(self, hu: np.ndarray, geometry: VolumeGeometry, *, series_uid: str) -> Detections:
        """Candidates in one scan: ``hu`` float ``[z, y, x]`` HU on ``geometry`` (any spacing);
        world centres in mm, at most 100 per scan is the LUNA16 convention."""
        ...


class DetectorRegistryError(LidcDetError):
    """Base class of registry errors."""


class DuplicateDetectorError(DetectorRegistryError):
    """A detector name is registered twice (built-in, decorator or entry point)."""


class UnknownDetectorError(DetectorRegistryError, KeyError):
    """No detector of that name is registered or installed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, DetectorFactory] = {}
#: Names registered by loading an entry point, with the entry point's value ("module:attr").
_FROM_ENTRY_POINT: dict[str, str] = {}
#: Built-in modules imported successfully (a failed import is retried on the next lookup).
_loaded_builtins: set[str] = set()


def register_detector(name: str) -> Callable[[DetectorFactory], DetectorFactory]:
    """Decorator registering a detector factory under ``name`` (error if the name is taken)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"detector name must be a non-empty string, got {name!r}")

    def deco(factory: DetectorFactory) -> DetectorFactory:
        if not callable(factory):
            raise TypeError(f"detector {name!r}: factory {factory!r} is not callable")
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise DuplicateDetectorError(f"detector name {name!r} is already registered by {_describe(_REGISTRY[name])}")
        _REGISTRY[name] = factory
        return factory

    return deco


def unregister_detector(name: str) -> None:
    """Remove a registered name (tests and interactive use)."""
    _REGISTRY.pop(name, None)
    _FROM_ENTRY_POINT.pop(name, None)


def _describe(factory: DetectorFactory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def _load_builtins() -> None:
    """Import the :data:`BUILTIN_MODULES` not imported yet. A module counts as loaded only once
    its import succeeded: a failure raises :class:`DetectorRegistryError` naming the module (and
    forgets the names it registered before failing), and the next lookup tries it again."""
    for module in BUILTIN_MODULES:
        if module in _loaded_builtins:
            continue
        before = set(_REGISTRY)
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any import failure hides the module's detectors
            for name in set(_REGISTRY) - before:
                unregister_detector(name)
            raise DetectorRegistryError(
                f"built-in detector module {module} failed to import ({type(err).__name__}: {err}); "
                "its detectors are unavailable"
            ) from err
        _loaded_builtins.add(module)


def _entry_points() -> dict[str, Any]:
    """``{name: EntryPoint}`` of the plug-in group; clashes raise :class:`DuplicateDetectorError`."""
    from importlib.metadata import entry_points

    found: dict[str, Any] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        if ep.name in found and found[ep.name].value != ep.value:
            raise DuplicateDetectorError(
                f"entry point {ENTRY_POINT_GROUP}:{ep.name} is declared twice ({found[ep.name].value} and {ep.value}, {dist})"
            )
        if ep.name in _REGISTRY and _FROM_ENTRY_POINT.get(ep.name) != ep.value:
            raise DuplicateDetectorError(
                f"entry point {ENTRY_POINT_GROUP}:{ep.name} = {ep.value} ({dist}) clashes with the registered "
                f"detector {_describe(_REGISTRY[ep.name])}"
            )
        found[ep.name] = ep
    return found


def list_detectors() -> list[str]:
    """Sorted names of the built-in, decorated and installed plug-in detectors."""
    _load_builtins()
    return sorted({*_REGISTRY, *_entry_points()})


def get_detector_factory(name: str) -> DetectorFactory:
    """The factory registered as ``name`` (loading its entry point if it is a plug-in)."""
    _load_builtins()
    if name in _REGISTRY:
        _entry_points()  # surfaces a plug-in clashing with this name
        return _REGISTRY[name]
    eps = _entry_points()
    if name not in eps:
        raise UnknownDetectorError(f"unknown detector {name!r}; available: {sorted({*_REGISTRY, *eps})}")
    ep = eps[name]
    try:
        factory = ep.load()
    except Exception as err:  # noqa: BLE001 - report any import failure of a plug-in the same way
        raise DetectorRegistryError(f"entry point {ENTRY_POINT_GROUP}:{name} = {ep.value} failed to load: {err}") from err
    if not callable(factory):
        raise DetectorRegistryError(f"entry point {ENTRY_POINT_GROUP}:{name} = {ep.value} is not callable")
    register_detector(name)(factory)
    _FROM_ENTRY_POINT[name] = ep.value
    return factory


def build_detector(cfg: str | Mapping[str, Any], **overrides: Any) -> Any:
    """Build a detector from a name or a mapping ``{"name": ..., **kwargs}`` (plus ``overrides``).

    The result is checked against :class:`Detector` (it must have ``predict``).
    """
    if isinstance(cfg, str):
        name, kwargs = cfg, {}
    elif isinstance(cfg, Mapping):
        if "name" not in cfg:
            raise DetectorRegistryError(f"detector config needs a 'name' key, got keys {sorted(cfg)}")
        kwargs = {k: v for k, v in cfg.items() if k != "name"}
        name = str(cfg["name"])
    else:
        raise TypeError(f"build_detector takes a name or a mapping, got {type(cfg).__name__}")
    detector = get_detector_factory(name)(**{**kwargs, **overrides})
    if not isinstance(detector, Detector):
        raise DetectorRegistryError(f"detector {name!r}: {type(detector).__name__} has no predict(hu, geometry, *, series_uid)")
    return detector
