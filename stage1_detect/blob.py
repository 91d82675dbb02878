"""``blob-lgbm``: a classical CAD detector, scale-space blobs scored by LightGBM.

A detector of the pre-deep-learning kind (Lindeberg's scale-space blobs; the dot
enhancement filter of Li et al., Med. Phys. 2003; the LUNA16 candidate systems), with
a learned score. Everything it learns is a few dozen hand-made numbers per candidate, so
it trains in minutes on a CPU and has little room to learn the twin's texture: the point
of it in this project is transfer from generated to real CT.

**Candidates.** The scan is resampled to ``spacing_mm`` (isotropic, linear), clipped to
``hu_clip`` and, for each scale ``s`` of ``sigmas_mm``, smoothed with a Gaussian of SD ``s``;
the scale-normalised blob response is ``R_s = -s^2 * laplacian(G_s)`` (HU; a bright sphere of
radius ``r`` answers most at ``s = r / sqrt(3)``). Every local maximum of ``R_s`` (3x3x3) above
``min_response`` inside the lung field (:func:`lidc_det.lungs.lung_fields` with its surface closed by a ball of
``lung_close_mm``, which puts juxtapleural nodules up to about twice that across inside; dilated by
``lung_margin_mm``; the whole volume with ``restrict_to_lungs: false``) is a candidate. Each is
ranked by the dot enhancement of its scale's Hessian (``e2^2 / |e0|`` of the ascending
eigenvalues when all three are negative, else 0: blobs high, vessels and fissures near 0), a
candidate closer than ``merge_mm`` to a better one is dropped, and the ``max_candidates`` best
are kept, together with the ``max_response_candidates`` of the strongest response (a nodule
against a vessel is not blob-shaped at any scale) and, with ``all_maxima_from_mm`` > 0, every maximum
of the scales from that sigma up (a large ground-glass nodule is too faint for the response cut and,
crossed by vessels, has no dot; a few hundred maxima per scan at 5 mm and above).

**Features** (:data:`FEATURE_NAMES`), at the candidate's centre:

* the response and the eigenvalues of the scale-normalised Hessian at every scale (a blob has
  three negative eigenvalues of similar size, a vessel two, a fissure one), and at the
  candidate's own scale the smoothed HU;
* the *object*: the connected component of voxels above half-way between the centre's HU and
  the lung around it, in a cube of ``cube_radius_factor`` radii: its volume, its equivalent
  diameter over the blob's, the share of it on the cube's faces (a vessel or the chest wall
  runs out of the cube, a nodule does not), its principal-axis ratios, its mean and SD of HU;
  with ``branch_features``, the number of branches it sends through the cube's faces (0 for a
  nodule, 2 for a vessel, 3 or more at a bifurcation) and the share of it that survives an
  erosion by a third of the blob's radius;
* the share of the cube outside the lung field (juxtapleural or mediastinal position);
* with ``ray_features`` (:data:`RAY_FEATURES`), how 26 rays from the centre leave the object (a nodule
  closes all round, a vessel leaves two open, a nodule on the chest wall a third to a half);
* with ``masked_features`` (:data:`MASKED_FEATURES`), the blob response and dot in the scan with everything
  outside the lung field set to lung: a juxtapleural nodule is a blob there; the best maxima of that masked
  dot also join the candidates (``max_masked_candidates``);
* with ``open_radii_mm`` (:data:`OPEN_FEATURES`), the object again after a grey-level opening by a ball of each
  radius: a nodule against a thinner vessel is cut off it, a vessel alone vanishes; with ``masked_object_features``
  the object again in the wall-masked scan: a nodule merged with the chest wall is cut off it.

No absolute position is used.

**Score.** LightGBM (binary) on those features; a training candidate is positive when it hits a
target nodule (LUNA16 rule: world distance below the nodule's radius), left out when it hits
only an irrelevant finding, negative otherwise; positives on subsolid nodules (texture rating
<= 2, rare in LIDC and so in the twins) weigh ``lgbm_subsolid_weight``, and every candidate of a semi-real training
scan (series UID ``semireal-...``: nodules inserted into a real or twin background) ``lgbm_semireal_weight``, every
candidate of any other training scan (a twin) ``lgbm_twin_weight``. With ``lgbm_bags`` > 1,
that many boosters are trained with seeds ``seed + k`` and their probabilities averaged. What LightGBM sees
(:func:`model_matrix`) may add HU relative to the surrounding lung (``lgbm_relative_hu``) and leave columns out
(``lgbm_drop_features``); ``lgbm_feature_fraction``, ``lgbm_lambda_l2`` and ``lgbm_extra_trees`` regularise the
boosters (LightGBM's own options; defaults 0.8, 0, off); ``train_blur_copies`` adds blurred copies of each training scan (:class:`BlurredCase`).
None of these change the candidates, so they share the feature cache. At inference candidates are scored, greedily
suppressed within ``nms_radius_factor`` radii (at least ``merge_mm``) of a better one (a vessel
answering at a large scale must not hide a small nodule beside it), and the ``max_detections`` best returned
(world centres, diameter ``2 * sqrt(3) * s``).

:meth:`BlobDetector.fit` caches each training scan's features (``out_dir/features``) and writes
``out_dir/blob_model.txt`` (LightGBM's text model) and ``blob_model.json`` (config, feature
names, training figures); a rerun with the same settings and scans reuses them. Build a
trained detector with ``build_detector({"name": "blob-lgbm", "checkpoint": "out/blob_model.txt"})``:
a text model, no pickle.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lidc_det.errors import ConfigError, LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections
from stage1_detect.registry import register_detector

if TYPE_CHECKING:
    from lidc_det.cluster import RunReport

MODEL_FILE = "blob_model.txt"
META_FILE = "blob_model.json"
SQRT3 = float(np.sqrt(3.0))
SEMIREAL_PREFIX = "semireal-"
"""Series UIDs of semi-real scans (:func:`lidc_det.synthetic.semireal.make_semireal_dataset`) start with this."""


class BlobModelError(LidcDetError):
    """A blob-lgbm model file is missing, unreadable or does not match this code."""


@dataclass(frozen=True)
class BlobConfig:
    """Settings of :class:`BlobDetector` (see the module docstring for what each does).

    Candidate fields (all but ``lgbm_*``, ``train_*``, ``seed``, ``nms_radius_factor``, ``max_detections``) define the features:
    a model trained with other values is refused by :meth:`BlobDetector.from_checkpoint`.
    """

    spacing_mm: float = 1.0
    hu_clip: tuple[float, float] = (-1000.0, 300.0)
    sigmas_mm: tuple[float, ...] = (1.0, 1.5, 2.2, 3.3, 5.0, 7.5)
    min_response: float = 30.0
    lung_margin_mm: float = 5.0
    lung_close_mm: float = 10.0
    restrict_to_lungs: bool = True
    merge_mm: float = 3.0
    max_candidates: int = 1500
    max_response_candidates: int = 300
    all_maxima_from_mm: float = 0.0
    cube_radius_factor: float = 2.5
    min_cube_mm: float = 8.0
    max_cube_mm: float = 24.0
    branch_features: bool = True
    ray_features: bool = False
    masked_features: bool = False
    max_masked_candidates: int = 300
    open_radii_mm: tuple[float, ...] = ()
    masked_object_features: bool = False
    # scoring and output
    nms_radius_factor: float = 0.5
    max_detections: int = 100
    lgbm_rounds: int = 300
    lgbm_learning_rate: float = 0.05
    lgbm_num_leaves: int = 15
    lgbm_min_data_in_leaf: int = 10
    lgbm_feature_fraction: float = 0.8
    lgbm_lambda_l2: float = 0.0
    lgbm_extra_trees: bool = False
    lgbm_neg_per_pos: float = 0.0
    lgbm_subsolid_weight: float = 3.0
    lgbm_semireal_weight: float = 1.0
    lgbm_twin_weight: float = 1.0
    lgbm_bags: int = 1
    lgbm_relative_hu: bool = False
    lgbm_drop_features: tuple[str, ...] = ()
    # training augmentation: blurred copies of each training scan (thicker slices, softer kernel)
    train_blur_copies: int = 0
    train_blur_sigma_z_mm: tuple[float, float] = (0.3, 1.0)
    train_blur_sigma_xy_mm: tuple[float, float] = (0.0, 0.5)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.spacing_mm <= 0:
            raise ConfigError(f"blob-lgbm: spacing_mm must be > 0, got {self.spacing_mm}")
        s = tuple(float(v) for v in self.sigmas_mm)
        if not s or any(v <= 0 for v in s) or list(s) != sorted(set(s)):
            raise ConfigError(f"blob-lgbm: sigmas_mm must be positive and increasing, got {self.sigmas_mm}")
        object.__setattr__(self, "sigmas_mm", s)
        object.__setattr__(self, "hu_clip", (float(self.hu_clip[0]), float(self.hu_clip[1])))
        object.__setattr__(self, "lgbm_drop_features", tuple(str(v) for v in self.lgbm_drop_features))
        rho = tuple(float(v) for v in self.open_radii_mm)
        if any(v < self.spacing_mm for v in rho) or list(rho) != sorted(set(rho)) or len({_open_tag(v) for v in rho}) < len(rho):
            raise ConfigError(f"blob-lgbm: open_radii_mm must be increasing, distinct to 0.1 mm and >= spacing_mm "
                              f"({self.spacing_mm}), got {self.open_radii_mm}")
        object.__setattr__(self, "open_radii_mm", rho)
        for name in ("train_blur_sigma_z_mm", "train_blur_sigma_xy_mm"):
            lo, hi = (float(v) for v in getattr(self, name))
            if not 0.0 <= lo <= hi:
                raise ConfigError(f"blob-lgbm: {name} must be a range 0 <= low <= high, got {getattr(self, name)}")
            object.__setattr__(self, name, (lo, hi))
        if self.train_blur_copies < 0:
            raise ConfigError(f"blob-lgbm: train_blur_copies must be >= 0, got {self.train_blur_copies}")
        known = feature_names(self) + (list(RELATIVE_HU) if self.lgbm_relative_hu else [])
        unknown = sorted(set(self.lgbm_drop_features) - set(known))
        if unknown:
            raise ConfigError(f"blob-lgbm: lgbm_drop_features {unknown} are not features; known: {known}")
        if self.lgbm_semireal_weight <= 0 or self.lgbm_twin_weight <= 0:
            raise ConfigError(f"blob-lgbm: lgbm_semireal_weight and lgbm_twin_weight must be > 0, got "
                              f"{self.lgbm_semireal_weight}, {self.lgbm_twin_weight}")
        if self.lgbm_bags < 1:
            raise ConfigError(f"blob-lgbm: lgbm_bags must be >= 1, got {self.lgbm_bags}")
        if not 0.0 < self.lgbm_feature_fraction <= 1.0 or self.lgbm_lambda_l2 < 0:
            raise ConfigError(f"blob-lgbm: lgbm_feature_fraction must be in (0, 1] and lgbm_lambda_l2 >= 0, got "
                              f"{self.lgbm_feature_fraction}, {self.lgbm_lambda_l2}")
        if self.all_maxima_from_mm < 0:
            raise ConfigError(f"blob-lgbm: all_maxima_from_mm must be >= 0 (0: off), got {self.all_maxima_from_mm}")
        if self.max_candidates < 1 or self.max_detections < 1 or self.max_masked_candidates < 1:
            raise ConfigError("blob-lgbm: max_candidates, max_masked_candidates and max_detections must be >= 1")

    def candidate_key(self) -> str:
        """Hash of the fields that define candidates and features (the feature cache's key)."""
        d = {k: v for k, v in asdict(self).items()
             if not k.startswith(("lgbm_", "train_")) and k not in ("seed", "max_detections", "nms_radius_factor")}
        if not self.branch_features:  # features computed before the field existed keep their key
            del d["branch_features"]
        return hashlib.sha1(json.dumps(self._without_later_defaults(d), sort_keys=True).encode()).hexdigest()[:12]

    def model_settings(self) -> dict[str, Any]:
        """The fields that define a trained model (with the training scans, the model file's ``data_key``):
        all but the inference-only ones."""
        return self._without_later_defaults(
            {k: v for k, v in asdict(self).items() if k not in ("max_detections", "nms_radius_factor")})

    def _without_later_defaults(self, d: dict[str, Any]) -> dict[str, Any]:
        """``d`` (fields of this config) without the fields added later while they are at their default
        (:data:`ADDED_LATER`), and without the settings that only mean something beside them, so that caches
        and models written before those fields existed keep their keys."""
        for k, default in ADDED_LATER:
            if k in d and d[k] == default:
                del d[k]
        if not self.masked_features:
            d.pop("max_masked_candidates", None)
        if self.train_blur_copies == 0:
            d.pop("train_blur_sigma_z_mm", None)
            d.pop("train_blur_sigma_xy_mm", None)
        return d


ADDED_LATER: tuple[tuple[str, Any], ...] = (
    ("lgbm_relative_hu", False), ("lgbm_drop_features", ()), ("train_blur_copies", 0), ("lgbm_semireal_weight", 1.0),
    ("ray_features", False), ("masked_features", False), ("lung_close_mm", 10.0), ("open_radii_mm", ()),
    ("masked_object_features", False), ("lgbm_feature_fraction", 0.8), ("lgbm_lambda_l2", 0.0),
    ("lgbm_extra_trees", False), ("all_maxima_from_mm", 0.0), ("lgbm_twin_weight", 1.0),
)
"""Fields of :class:`BlobConfig` added after caches and models were written, with their defaults (the behaviour
before they existed; 10 mm is :func:`lidc_det.lungs.lung_fields`' closing)."""


def feature_names(cfg: BlobConfig) -> list[str]:
    """Names of the feature columns of a config (the order of :func:`scan_candidates`' table)."""
    names = ["scale_mm", "response", "dot", "hu_smooth", "hu_centre"]
    for k in range(len(cfg.sigmas_mm)):
        names += [f"r{k}", f"e0_{k}", f"e1_{k}", f"e2_{k}", f"tube_{k}", f"sheet_{k}"]
    names += [
        "obj_volume_mm3", "obj_diam_over_blob", "obj_on_faces", "obj_axis_mid", "obj_axis_min",
        "obj_hu_mean", "obj_hu_sd", "obj_threshold_hu", "lung_bg_hu", "cube_outside_lung",
    ]
    if cfg.branch_features:
        names += ["obj_face_crossings", "obj_core_fraction"]
    if cfg.ray_features:
        names += list(RAY_FEATURES)
    if cfg.masked_features:
        names += list(MASKED_FEATURES)
    for rho in cfg.open_radii_mm:
        names += [f"open{_open_tag(rho)}_{n}" for n in OPEN_FEATURES]
    if cfg.masked_object_features:
        names += [f"masked_obj_{n}" for n in OPEN_FEATURES]
    return names


def _open_tag(radius_mm: float) -> str:
    """The name of an opening radius in feature names: tenths of a mm, two digits at least (1.5 mm -> ``15``)."""
    return f"{int(round(10 * radius_mm)):02d}"


OPEN_FEATURES: tuple[str, ...] = ("hu_centre", "volume_fraction", "diam_over_blob", "face_crossings", "axis_min")
"""With ``open_radii_mm``, for each radius ``rho`` (columns ``open<rho in tenths of a mm>_<name>``): the *object* again
(same threshold, same cube) in the scan after a grey-level opening by a ball of radius ``rho``, which removes every
bright structure thinner than ``2 rho`` and keeps what is thicker (a nodule of radius above ``rho`` survives it
whole). A nodule against a vessel thinner than itself is one object with the vessel in the scan (large, elongated,
two branches through the cube: vessel-like) and a compact one after the opening. Columns: the opened image at the
centre, the opened object's volume over the object's, its equivalent diameter over the blob's, its branches
through the cube's faces and its smallest principal-axis ratio (0 and 0 when nothing at the centre survives).
With ``masked_object_features`` the same five columns (``masked_obj_<name>``) of the object in the *wall-masked*
scan (:data:`MASKED_FEATURES`): a nodule merged with the chest wall is one object with the wall in the scan (large,
leaving the cube) and, cut at the lung field's border, a compact one in the masked scan."""


MASKED_FEATURES: tuple[str, ...] = ("masked_response", "masked_dot")
"""With ``masked_features``: the blob response and dot enhancement at the candidate's own scale in the *wall-masked*
scan, where every voxel outside the lung field (:func:`lidc_det.lungs.lung_fields`, not dilated; it holds
juxtapleural nodules) is set to the lung's median HU. Against the chest wall a nodule is half a blob at best
(one Hessian eigenvalue near 0, dot near 0); with the wall masked it is a blob again. The ``max_masked_candidates``
best local maxima of the masked dot join the candidates."""


RAY_FEATURES: tuple[str, ...] = ("ray_open_fraction", "ray_closed_median", "ray_closed_min", "ray_closed_cv")
"""With ``ray_features``: from the candidate's centre, 26 rays (the directions of a voxel's 26 neighbours) run
until the image falls below the object threshold (``obj_threshold_hu``) or to 3 blob radii (6-24 mm): the share of rays that stay above it all the way (*open*: about 0 for a nodule, 0.1 for a vessel, 0.4-0.5
against the chest wall), and the median, minimum and coefficient of variation of the other rays' lengths over the
blob radius (near 1 with a small spread for a round nodule, also one on a vessel or on the wall)."""

_RAY_DIRECTIONS: np.ndarray = np.array(
    [d for d in np.ndindex(3, 3, 3) if d != (1, 1, 1)], dtype=np.float64
) - 1.0
_RAY_DIRECTIONS /= np.linalg.norm(_RAY_DIRECTIONS, axis=1, keepdims=True)


def _ray_features(img: np.ndarray, pts: np.ndarray, radius_mm: np.ndarray, threshold_hu: np.ndarray,
                  spacing_mm: float, reach_factor: float = 3.0, step_mm: float = 0.5) -> np.ndarray:
    """:data:`RAY_FEATURES` ``(N, 4)`` of candidates at integer voxels ``pts`` ``(N, 3)`` of the isotropic
    ``img`` (``[z, y, x]`` HU, voxel ``spacing_mm``), with blob radii and object thresholds ``(N,)``."""
    from scipy.ndimage import map_coordinates

    reach = np.clip(reach_factor * np.asarray(radius_mm, dtype=np.float64), 6.0, 24.0)
    steps = np.arange(1, int(np.ceil(reach.max() / step_mm)) + 1) * step_mm  # (S,) mm
    out = np.zeros((len(pts), len(RAY_FEATURES)), dtype=np.float64)
    for lo in range(0, len(pts), 256):
        p = np.asarray(pts[lo:lo + 256], dtype=np.float64)
        n = len(p)
        coords = p[:, None, None, :] + _RAY_DIRECTIONS[None, :, None, :] * (steps[None, None, :, None] / spacing_mm)
        vals = map_coordinates(img, coords.reshape(-1, 3).T, order=1, mode="nearest").reshape(n, len(_RAY_DIRECTIONS), -1)
        r = reach[lo:lo + n, None]
        below = (vals < threshold_hu[lo:lo + n, None, None]) & (steps[None, None, :] <= r[:, :, None])
        closed = below.any(axis=2)
        length = np.where(closed, steps[np.argmax(below, axis=2)], r)  # (n, 26) mm
        rad = np.asarray(radius_mm[lo:lo + n], dtype=np.float64)
        for i in range(n):
            c = length[i, closed[i]]
            out[lo + i, 0] = 1.0 - closed[i].mean()
            if len(c):
                out[lo + i, 1] = np.median(c) / rad[i]
                out[lo + i, 2] = c.min() / rad[i]
                out[lo + i, 3] = c.std() / max(c.mean(), 1e-6)
            else:
                out[lo + i, 1] = out[lo + i, 2] = reach[lo + i] / rad[i]
    return out


RELATIVE_HU: dict[str, str] = {
    "hu_centre_rel": "hu_centre", "hu_smooth_rel": "hu_smooth", "obj_hu_mean_rel": "obj_hu_mean",
    "obj_threshold_rel": "obj_threshold_hu",
}
"""With ``lgbm_relative_hu``: a column of HU above the lung around the candidate (``lung_bg_hu``) for each
absolute HU column, named by the new column."""


def model_matrix(features: np.ndarray, cfg: BlobConfig) -> tuple[np.ndarray, list[str]]:
    """The columns LightGBM sees: the candidate features ``(N, F)`` of :func:`feature_names`, plus with
    ``lgbm_relative_hu`` the :data:`RELATIVE_HU` contrasts, minus ``lgbm_drop_features``.

    Returns ``(N, F')`` float32 and the ``F'`` column names. Both depend on the config only, so a
    model trained on them scores any scan's candidates of the same ``candidate_key``.
    """
    names = feature_names(cfg)
    x = np.asarray(features, dtype=np.float32).reshape(-1, len(names))
    if cfg.lgbm_relative_hu:
        bg = x[:, names.index("lung_bg_hu")]
        x = np.concatenate([x, np.stack([x[:, names.index(src)] - bg for src in RELATIVE_HU.values()], axis=1)], axis=1)
        names = names + list(RELATIVE_HU)
    keep = [k for k, n in enumerate(names) if n not in cfg.lgbm_drop_features]
    return x[:, keep], [names[k] for k in keep]


def model_columns(cfg: BlobConfig) -> list[str]:
    """The names of :func:`model_matrix`'s columns for ``cfg`` (a trained model's feature names)."""
    return model_matrix(np.zeros((0, len(feature_names(cfg))), dtype=np.float32), cfg)[1]


FEATURE_NAMES: list[str] = feature_names(BlobConfig())
"""The feature columns of the default scales."""


@dataclass(frozen=True, eq=False)
class BlobCandidates:
    """Candidates of one scan before scoring.

    Attributes:
        centers_xyz_mm: ``(N, 3)`` world LPS centres (mm).
        scales_mm: ``(N,)`` the Gaussian SD at which each answered most (mm); radius ``sqrt(3)`` times it.
        features: ``(N, F)`` float32, columns :func:`feature_names` of the config's scales.
        seconds: wall time of the candidate and feature stage.
    """

    centers_xyz_mm: np.ndarray
    scales_mm: np.ndarray
    features: np.ndarray
    seconds: float

    def __len__(self) -> int:
        return int(self.scales_mm.shape[0])


# ----------------------------------------------------------------------------- candidates
def _lung_mask(hu: np.ndarray, geometry: VolumeGeometry, margin_mm: float, close_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The lung field (its surface closed by a ball of ``close_mm``) and the field dilated by ``margin_mm`` (bool
    ``[z, y, x]`` each); the body mask twice when no field is found."""
    import warnings

    from scipy import ndimage as ndi

    from lidc_det.lungs import LungFieldError, lung_fields
    from stage1_detect.preprocess import body_mask

    try:
        mask = lung_fields(hu, geometry, close_mm=close_mm).mask
    except LungFieldError as err:
        warnings.warn(f"blob-lgbm: no lung field ({err}); using the body mask", stacklevel=3)
        body = body_mask(hu)
        return body, body
    it = int(round(margin_mm / min(geometry.spacing_zyx)))
    return mask, (ndi.binary_dilation(mask, iterations=it) if it > 0 else mask)


def _hessian_at(g: np.ndarray, pts: np.ndarray, spacing: float) -> np.ndarray:
    """Hessian ``(N, 3, 3)`` of ``g`` at integer voxel points ``pts`` (central differences, per mm^2)."""
    hi = np.asarray(g.shape) - 2
    p = np.clip(pts, 1, hi)
    z, y, x = p[:, 0], p[:, 1], p[:, 2]
    c = g[z, y, x]
    h = np.empty((len(p), 3, 3), dtype=np.float64)
    axes = ((1, 0, 0), (0, 1, 0), (0, 0, 1))

    def at(d: tuple[int, int, int]) -> np.ndarray:
        return g[z + d[0], y + d[1], x + d[2]].astype(np.float64)

    for i, a in enumerate(axes):
        h[:, i, i] = at(a) + at(tuple(-v for v in a)) - 2 * c  # type: ignore[arg-type]
        for j in range(i + 1, 3):
            b = axes[j]
            pp = tuple(u + v for u, v in zip(a, b))
            mm = tuple(-u - v for u, v in zip(a, b))
            pm = tuple(u - v for u, v in zip(a, b))
            mp = tuple(-u + v for u, v in zip(a, b))
            h[:, i, j] = h[:, j, i] = (at(pp) + at(mm) - at(pm) - at(mp)) / 4.0  # type: ignore[arg-type]
    return h / spacing**2


def _cube_box(pt: np.ndarray, radius_mm: float, shape: tuple[int, ...], cfg: BlobConfig) -> tuple[slice, ...]:
    """The object cube of a candidate at voxel ``pt`` with blob radius ``radius_mm`` (``cube_radius_factor`` radii,
    clipped to ``min_cube_mm / 2 .. max_cube_mm``), cut to the image ``shape``."""
    half = int(np.ceil(np.clip(cfg.cube_radius_factor * radius_mm, cfg.min_cube_mm / 2, cfg.max_cube_mm) / cfg.spacing_mm))
    lo = np.maximum(pt - half, 0)
    hi = np.minimum(pt + half + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _centre_object(cube: np.ndarray, c: tuple[int, ...], thr: float) -> np.ndarray | None:
    """The connected component of ``cube > thr`` at voxel ``c`` (bool, the cube's shape), or, when ``c`` fell just
    below the threshold, that of its brightest labelled 26-neighbour; None when there is none."""
    from scipy import ndimage as ndi

    labels, _ = ndi.label(cube > thr)
    lab = labels[c]
    if lab == 0:
        zs, ys, xs = (slice(max(v - 1, 0), v + 2) for v in c)
        near = labels[zs, ys, xs]
        vals = np.where(near > 0, cube[zs, ys, xs], -np.inf)
        lab = int(near.ravel()[int(np.argmax(vals))]) if np.isfinite(vals.max()) else 0
    return None if lab == 0 else labels == lab


def _on_faces(obj: np.ndarray) -> np.ndarray:
    """The voxels of ``obj`` on the faces of its cube (bool, same shape)."""
    faces = np.zeros_like(obj)
    faces[0], faces[-1], faces[:, 0], faces[:, -1], faces[:, :, 0], faces[:, :, -1] = (
        obj[0], obj[-1], obj[:, 0], obj[:, -1], obj[:, :, 0], obj[:, :, -1]
    )
    return faces


def _face_crossings(faces: np.ndarray) -> int:
    """Branches through the cube's faces: connected (26) components of :func:`_on_faces`."""
    from scipy import ndimage as ndi

    return int(ndi.label(faces, structure=np.ones((3, 3, 3), dtype=bool))[1])


def _axis_ratios(obj: np.ndarray) -> tuple[float, float]:
    """Middle and smallest principal-axis length over the largest of an object (1, 1 below 4 voxels)."""
    n = int(obj.sum())
    if n < 4:
        return 1.0, 1.0
    ev = np.maximum(np.sort(np.linalg.eigvalsh(np.cov(np.argwhere(obj).astype(np.float64).T)))[::-1], 1e-6)
    return float(np.sqrt(ev[1] / ev[0])), float(np.sqrt(ev[2] / ev[0]))


def _equivalent_diameter(volume_mm3: float) -> float:
    """The diameter (mm) of the sphere of ``volume_mm3``."""
    return 2.0 * (3.0 * volume_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)


def _object_features(
    hu: np.ndarray, lung: np.ndarray, pt: np.ndarray, radius_mm: float, hu_smooth: float, cfg: BlobConfig
) -> list[float]:
    """The connected-object features of one candidate (see the module docstring)."""
    from scipy import ndimage as ndi

    sp = cfg.spacing_mm
    box = _cube_box(pt, radius_mm, hu.shape, cfg)
    cube, lcube = hu[box], lung[box]
    c = tuple(int(v) for v in pt - np.array([b.start for b in box]))
    outside = 1.0 - float(lcube.mean())
    inside_vals = cube[lcube]
    bg = float(np.percentile(inside_vals, 20)) if inside_vals.size >= 10 else float(np.percentile(cube, 20))
    thr = 0.5 * (max(hu_smooth, bg + 50.0) + bg)
    obj = _centre_object(cube, c, thr)
    if obj is None:
        return [0.0, 0.0, 0.0, 0.0, 0.0, hu_smooth, 0.0, thr, bg, outside] + ([0.0, 0.0] if cfg.branch_features else [])
    n = int(obj.sum())
    vol = n * sp**3
    faces = _on_faces(obj)
    on_faces = float(faces.sum()) / max(n, 1)
    ax_mid, ax_min = _axis_ratios(obj)
    vals = cube[obj]
    diam = _equivalent_diameter(vol)
    out = [vol, diam / (2.0 * radius_mm), on_faces, ax_mid, ax_min, float(vals.mean()), float(vals.std()), thr, bg, outside]
    if cfg.branch_features:
        # branches leaving the cube (0 for a nodule, 2 for a vessel, 3+ at a bifurcation) and the share of the
        # object that survives an erosion by a third of the blob's radius (a nodule keeps its core, a vessel
        # thinner than the blob does not)
        it = max(1, int(round(radius_mm / (3.0 * sp))))
        core = ndi.binary_erosion(obj, iterations=it).sum() / max(n, 1)
        out += [float(_face_crossings(faces)), float(core)]
    return out


def _ball(radius_vox: float) -> np.ndarray:
    """A ball footprint (bool cube) of ``radius_vox`` voxels."""
    n = int(np.floor(radius_vox))
    g = np.mgrid[-n : n + 1, -n : n + 1, -n : n + 1]
    return (g**2).sum(axis=0) <= radius_vox**2 + 1e-6


def _object_again(image: np.ndarray, pts: np.ndarray, radius_mm: np.ndarray, thr: np.ndarray,
                  volume_mm3: np.ndarray, cfg: BlobConfig) -> np.ndarray:
    """:data:`OPEN_FEATURES` ``(N, 5)``: the object of candidates at voxels ``pts`` ``(N, 3)`` again in ``image``,
    another image of the isotropic lung box (after a grey opening, or wall-masked), with their blob radii, object
    thresholds (HU) and object volumes in the scan ``(N,)``."""
    sp = cfg.spacing_mm
    out = np.zeros((len(pts), len(OPEN_FEATURES)))
    for i, (pt, r, t, v) in enumerate(zip(pts, radius_mm, thr, volume_mm3)):
        box = _cube_box(pt, float(r), image.shape, cfg)
        cube = image[box]
        c = tuple(int(a) for a in pt - np.array([b.start for b in box]))
        out[i, 0] = cube[c]
        obj = _centre_object(cube, c, float(t))
        if obj is None:
            continue
        vol = float(obj.sum()) * sp**3
        out[i, 1] = vol / max(float(v), sp**3)
        out[i, 2] = _equivalent_diameter(vol) / (2.0 * float(r))
        out[i, 3] = _face_crossings(_on_faces(obj))
        out[i, 4] = _axis_ratios(obj)[1]
    return out


def scan_candidates(hu: np.ndarray, geometry: VolumeGeometry, cfg: BlobConfig) -> BlobCandidates:
    """Blob candidates and their features in one scan (``hu``: ``[z, y, x]`` HU on ``geometry``)."""
    from lidc_det.resample import resample_image

    t0 = time.perf_counter()
    hu = np.asarray(hu)
    if hu.ndim != 3 or hu.shape != geometry.shape_zyx:
        raise ValueError(f"blob-lgbm: hu shape {hu.shape} does not match geometry {geometry.shape_zyx}")
    sp = cfg.spacing_mm
    if not np.allclose(geometry.spacing_zyx, (sp, sp, sp), atol=1e-3):
        hu, geometry = resample_image(hu, geometry, (sp, sp, sp))
    img = np.clip(np.asarray(hu, dtype=np.float32), *cfg.hu_clip)
    if cfg.restrict_to_lungs:
        field_full, lung_full = _lung_mask(img, geometry, cfg.lung_margin_mm, cfg.lung_close_mm)
    else:
        field_full = lung_full = np.ones(img.shape, dtype=bool)
    n_feat = len(feature_names(cfg))
    empty = BlobCandidates(np.zeros((0, 3)), np.zeros(0), np.zeros((0, n_feat), np.float32), 0.0)
    if not lung_full.any():
        return replace(empty, seconds=time.perf_counter() - t0)
    # work inside the lung box plus the largest filter's reach
    pad = int(np.ceil(3 * max(cfg.sigmas_mm) / sp)) + 2
    nz = np.argwhere(lung_full)
    lo = np.maximum(nz.min(axis=0) - pad, 0)
    hi = np.minimum(nz.max(axis=0) + pad + 1, img.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = img[box]
    lung = lung_full[box]
    smoothed: list[np.ndarray] = []
    responses: list[np.ndarray] = []
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []  # points, responses, dot, scale index
    for k, s in enumerate(cfg.sigmas_mm):
        g, r, p, r_p, dot_p = _scale_level(sub, s, lung, cfg)
        found.append((p, r_p, dot_p, k))
        smoothed.append(g)
        responses.append(r)
    pts = np.concatenate([f[0] for f in found])
    if len(pts) == 0:
        return replace(empty, seconds=time.perf_counter() - t0)
    resp = np.concatenate([f[1] for f in found])
    dot = np.concatenate([f[2] for f in found])
    kidx = np.concatenate([np.full(len(f[0]), f[3]) for f in found])
    keep = np.union1d(_greedy_keep(pts, dot + 1e-6 * resp, cfg.merge_mm / sp, cfg.max_candidates),
                      _greedy_keep(pts, resp, cfg.merge_mm / sp, cfg.max_response_candidates))
    if cfg.all_maxima_from_mm > 0:  # every maximum of the coarse scales: faint, large blobs (ground glass) lose both cuts
        keep = np.union1d(keep, np.flatnonzero(np.asarray(cfg.sigmas_mm)[kidx] >= cfg.all_maxima_from_mm))
    masked = np.zeros((len(pts), 2))
    sub_m = _wall_masked(sub, field_full[box]) if cfg.masked_features or cfg.masked_object_features else sub
    if cfg.masked_features:
        pts, resp, dot, kidx, masked = _with_masked_peaks(sub_m, field_full[box], pts, resp, dot, kidx, smoothed,
                                                          responses, cfg)
        keep = np.union1d(keep, _greedy_keep(pts, masked[:, 1] + 1e-6 * masked[:, 0], cfg.merge_mm / sp,
                                             cfg.max_masked_candidates))
    pts, resp, dot, kidx, masked = pts[keep], resp[keep], dot[keep], kidx[keep], masked[keep]
    n = len(pts)
    sig = np.asarray(cfg.sigmas_mm)[kidx]
    z, y, x = pts[:, 0], pts[:, 1], pts[:, 2]
    cols: list[np.ndarray] = [sig, resp, dot, np.array([smoothed[k][p[0], p[1], p[2]] for k, p in zip(kidx, pts)]),
                              sub[z, y, x]]
    for k, s in enumerate(cfg.sigmas_mm):
        h = _hessian_at(smoothed[k], pts, sp) * s**2
        ev = np.linalg.eigvalsh(h)  # ascending: a bright blob has all three negative
        e0 = np.minimum(ev[:, 0], -1e-3)
        cols += [responses[k][z, y, x], ev[:, 0], ev[:, 1], ev[:, 2], ev[:, 2] / e0, ev[:, 1] / e0]
    hu_smooth = cols[3]
    obj = np.array(
        [_object_features(sub, lung, p, SQRT3 * s, float(hs), cfg) for p, s, hs in zip(pts, sig, hu_smooth)]
    ).reshape(n, -1)
    names = feature_names(cfg)
    thr = obj[:, names.index("obj_threshold_hu") - len(cols)]  # the object's threshold (HU) and volume (mm^3)
    vol = obj[:, names.index("obj_volume_mm3") - len(cols)]
    if cfg.ray_features:
        obj = np.column_stack([obj, _ray_features(sub, pts, SQRT3 * sig, thr, sp)])
    if cfg.masked_features:
        obj = np.column_stack([obj, masked])
    if cfg.open_radii_mm or cfg.masked_object_features:
        from scipy import ndimage as ndi

        for rho in cfg.open_radii_mm:
            opened = ndi.grey_opening(sub, footprint=_ball(rho / sp))
            obj = np.column_stack([obj, _object_again(opened, pts, SQRT3 * sig, thr, vol, cfg)])
        if cfg.masked_object_features:
            obj = np.column_stack([obj, _object_again(sub_m, pts, SQRT3 * sig, thr, vol, cfg)])
    feats = np.column_stack([*cols, obj]).astype(np.float32)
    centres = geometry.voxel_to_world((pts + lo).astype(np.float64))
    return BlobCandidates(np.asarray(centres).reshape(-1, 3), sig.astype(np.float64), feats, time.perf_counter() - t0)


def _scale_level(
    img: np.ndarray, s: float, region: np.ndarray, cfg: BlobConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One scale ``s`` (mm) of the scale space of the isotropic ``img``: the smoothed image, the scale-normalised
    blob response ``-s^2 * laplacian`` (the voxel units cancel), and its local maxima (3x3x3) above
    ``min_response`` inside ``region``: their voxels ``(M, 3)``, responses and dot enhancement ``(M,)``."""
    from scipy import ndimage as ndi

    sp = cfg.spacing_mm
    g = ndi.gaussian_filter(img, s / sp, truncate=3.0)
    r = ndi.laplace(g)
    r *= -((s / sp) ** 2)
    peak = (r == ndi.maximum_filter(r, size=3)) & (r > cfg.min_response) & region
    p = np.argwhere(peak)
    return g, r, p, r[peak], _dot_at(g, p, s, sp)


def _dot_at(g: np.ndarray, pts: np.ndarray, s: float, spacing: float) -> np.ndarray:
    """:func:`_dot` of the scale-normalised Hessian of the smoothed image ``g`` (scale ``s`` mm) at voxels ``pts``."""
    return _dot(np.linalg.eigvalsh(_hessian_at(g, pts, spacing) * s**2))


def _wall_masked(sub: np.ndarray, field: np.ndarray) -> np.ndarray:
    """The *wall-masked* lung box: every voxel of ``sub`` outside the lung ``field`` set to the field's median HU
    (-850 HU when the field is empty)."""
    fill = np.float32(np.median(sub[field])) if field.any() else np.float32(-850.0)
    return np.where(field, sub, fill)


def _with_masked_peaks(
    sub_m: np.ndarray, field: np.ndarray, pts: np.ndarray, resp: np.ndarray, dot: np.ndarray, kidx: np.ndarray,
    smoothed: list[np.ndarray], responses: list[np.ndarray], cfg: BlobConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The candidate pool (points, response, dot, scale index) grown by the local maxima of the wall-masked
    response (:data:`MASKED_FEATURES`), and for every point of it the masked response and dot at its own scale
    ``(N, 2)``. ``sub_m``: the wall-masked isotropic lung box (:func:`_wall_masked`), ``field``: its lung field,
    ``smoothed`` / ``responses``: the unmasked scale space of the box."""

    sp = cfg.spacing_mm
    masked = np.zeros((len(pts), 2))
    new: list[tuple[np.ndarray, int, np.ndarray, np.ndarray]] = []  # points, scale, masked response, masked dot
    for k, s in enumerate(cfg.sigmas_mm):
        g, r, q, r_q, dot_q = _scale_level(sub_m, s, field, cfg)
        sel = kidx == k
        p = pts[sel]
        masked[sel, 0] = r[p[:, 0], p[:, 1], p[:, 2]]
        masked[sel, 1] = _dot_at(g, p, s, sp)
        new.append((q, k, r_q, dot_q))
    for q, k, mr, md in new:
        if not len(q):
            continue
        pts = np.concatenate([pts, q])
        resp = np.concatenate([resp, responses[k][q[:, 0], q[:, 1], q[:, 2]]])
        dot = np.concatenate([dot, _dot_at(smoothed[k], q, cfg.sigmas_mm[k], sp)])
        kidx = np.concatenate([kidx, np.full(len(q), k)])
        masked = np.concatenate([masked, np.column_stack([mr, md])])
    return pts, resp, dot, kidx, masked


def _dot(ev: np.ndarray) -> np.ndarray:
    """Li's dot enhancement ``e2^2 / |e0|`` of ascending Hessian eigenvalues ``(N, 3)``, 0 unless all three are
    negative (a bright blob); a vessel (``e2`` near 0) or a fissure scores near 0."""
    e0, e2 = ev[:, 0], ev[:, 2]
    return np.where(e2 < 0, e2**2 / np.maximum(-e0, 1e-6), 0.0)


def _greedy_keep(points: np.ndarray, priority: np.ndarray, reach: float | np.ndarray, cap: int) -> np.ndarray:
    """Indices kept by greedy suppression, highest ``priority`` first (stable): each kept point drops every
    point within ``reach`` of it (its own entry when ``reach`` is per point; the distance ``<= reach``, in the
    units of ``points``); at most ``cap``. Serves the candidate merge and the output suppression."""
    from scipy.spatial import cKDTree

    reach = np.broadcast_to(np.asarray(reach, dtype=np.float64), (len(points),))
    tree = cKDTree(points)
    dead = np.zeros(len(points), dtype=bool)
    kept: list[int] = []
    for i in np.argsort(-priority, kind="stable"):
        if dead[i]:
            continue
        kept.append(int(i))
        if len(kept) >= cap:
            break
        dead[tree.query_ball_point(points[i], reach[i])] = True
    return np.asarray(kept, dtype=int)


# ----------------------------------------------------------------------------- labels
def _findings_arrays(findings: Sequence[tuple[Sequence[float], float]]) -> tuple[np.ndarray, np.ndarray]:
    """World centres ``(N, 3)`` and radii ``(N,)`` of ``(centre x, y, z mm, diameter mm)`` pairs."""
    centres = np.array([c for c, _ in findings], dtype=np.float64).reshape(-1, 3)
    return centres, np.array([d / 2.0 for _, d in findings], dtype=np.float64)


def candidate_labels(centres_xyz_mm: np.ndarray, case: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Per candidate ``1`` (hits a target), ``0`` (false positive) or ``-1`` (hits only an irrelevant
    finding), the index of the target each hits (``-1`` if none), and the number of targets."""
    from stage1_detect.data import case_findings

    targets, irrelevant = case_findings(case)
    tc, tr = _findings_arrays(targets)
    ic, ir = _findings_arrays(irrelevant)
    n = len(centres_xyz_mm)
    lab = np.zeros(n, dtype=np.int8)
    which = np.full(n, -1, dtype=int)
    if n and len(tc):
        d = np.linalg.norm(centres_xyz_mm[:, None] - tc[None], axis=2)
        hit = d < tr[None]
        lab[hit.any(axis=1)] = 1
        which = np.where(hit.any(axis=1), np.argmin(np.where(hit, d, np.inf), axis=1), -1)
    if n and len(ic):
        d = np.linalg.norm(centres_xyz_mm[:, None] - ic[None], axis=2)
        lab[(d < ir[None]).any(axis=1) & (lab == 0)] = -1
    return lab, which, len(tc)


# ----------------------------------------------------------------------------- detector
@register_detector("blob-lgbm")
class BlobDetector:
    """Scale-space blob candidates scored by LightGBM (see the module docstring).

    Args:
        checkpoint: a ``blob_model.txt`` written by :meth:`fit` (or its folder); its config wins,
            and ``overrides`` may only change ``max_detections`` and ``nms_radius_factor``.
        progress: tqdm bars over scans in :meth:`fit`.
        overrides: :class:`BlobConfig` fields.
    """

    def __init__(self, *, checkpoint: str | Path | None = None, progress: bool = True, **overrides: Any) -> None:
        unknown = set(overrides) - set(BlobConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"blob-lgbm: unknown settings {sorted(unknown)}; known: {sorted(BlobConfig.__dataclass_fields__)}")
        self.progress = progress
        self.device = "cpu"
        self._booster: Any = None
        self.meta: dict[str, Any] = {}
        if checkpoint is not None:
            self.config, self._booster, self.meta = load_blob_model(checkpoint)
            changed = set(overrides) - {"max_detections", "nms_radius_factor"}
            if changed:
                raise ConfigError(f"blob-lgbm: {sorted(changed)} define the trained model in {checkpoint} and cannot change")
            self.config = replace(self.config, **overrides)
        else:
            self.config = BlobConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
        self.checkpoint = None if checkpoint is None else Path(checkpoint)

    @property
    def trained(self) -> bool:
        return self._booster is not None

    def candidates(self, hu: np.ndarray, geometry: VolumeGeometry) -> BlobCandidates:
        """Unscored candidates of one scan (:func:`scan_candidates`)."""
        return scan_candidates(hu, geometry, self.config)

    def predict(self, hu: np.ndarray, geometry: VolumeGeometry, *, series_uid: str) -> Detections:
        """Scored candidates of one scan, best first, at most ``max_detections``.

        Raises:
            BlobModelError: the detector has not been trained or loaded.
        """
        return self.score_candidates(self.candidates(hu, geometry), series_uid=series_uid)

    def score_candidates(self, cand: BlobCandidates, *, series_uid: str, top: int | None = None) -> Detections:
        """Score one scan's candidates (of this config's :meth:`BlobConfig.candidate_key`), suppress and
        keep the ``max_detections`` best (``top``, when given, instead): the second half of :meth:`predict`.

        Raises:
            BlobModelError: the detector has not been trained or loaded.
        """
        scores = self.candidate_scores(cand)
        reach = np.maximum(self.config.nms_radius_factor * SQRT3 * cand.scales_mm, self.config.merge_mm)
        # a candidate is dropped when strictly closer than a kept one's reach
        keep = _greedy_keep(cand.centers_xyz_mm, scores, np.nextafter(reach, 0.0),
                            self.config.max_detections if top is None else top)
        return Detections(series_uid, cand.centers_xyz_mm[keep], 2 * SQRT3 * cand.scales_mm[keep], scores[keep])

    def candidate_scores(self, cand: BlobCandidates) -> np.ndarray:
        """LightGBM's probability for every candidate ``(N,)``, before suppression and the top-k cut.

        Raises:
            BlobModelError: the detector has not been trained or loaded.
        """
        if self._booster is None:
            raise BlobModelError("blob-lgbm: not trained; call fit() or build it with checkpoint=")
        return self._booster.predict(model_matrix(cand.features, self.config)[0]) if len(cand) else np.zeros(0)

    def fit(self, train_cases: Sequence[Any], val_cases: Sequence[Any], out_dir: str | Path, *,
            cache_dir: str | Path | None = None, **_: Any) -> dict[str, Any]:
        """Extract (or reuse) every training scan's candidates, train LightGBM, write the model.

        ``cache_dir`` (default ``out_dir/features``) holds the cached features, one folder per
        :meth:`BlobConfig.candidate_key`: models of other ``lgbm_*`` settings can share it.

        Returns the training summary also written to ``blob_model.json``: candidates, positives,
        candidate recall (share of target nodules hit by at least one candidate) on the training
        and validation scans, seconds.
        """
        import lightgbm as lgb
        from tqdm.auto import tqdm

        from lidc_det.atomic import write_json, write_text

        t0 = time.perf_counter()
        out = Path(out_dir)
        cache = out / "features" if cache_dir is None else Path(cache_dir)
        if not train_cases:
            raise ConfigError("blob-lgbm: fit needs at least one training scan")
        uids = sorted(c.series_uid for c in train_cases)
        fingerprints = {id(c): scan_fingerprint(c) for c in [*train_cases, *val_cases]}
        prints = sorted(fingerprints[id(c)] for c in train_cases)
        data_key = hashlib.sha1(json.dumps([self.config.model_settings(), prints], sort_keys=True).encode()).hexdigest()[:12]
        model_path = out / MODEL_FILE
        if model_path.exists():
            try:
                cfg, booster, meta = load_blob_model(model_path)
            except BlobModelError:
                meta = {}
            if meta.get("data_key") == data_key:
                self.config, self._booster, self.meta, self.checkpoint = cfg, booster, meta, model_path
                return meta
        xs, ys, ws, ks = [], [], [], []  # features, labels, subsolid weights, scan weights
        recall: dict[str, list[int]] = {"train": [0, 0], "val": [0, 0]}
        copies = [BlurredCase(c, k, self.config, fingerprints[id(c)]) for c in train_cases
                  for k in range(1, self.config.train_blur_copies + 1)]
        for c in copies:
            fingerprints[id(c)] = c.fingerprint
        bar = tqdm([("train", c) for c in [*train_cases, *copies]] + [("val", c) for c in val_cases],
                   desc="blob-lgbm candidates", disable=not self.progress)
        for part, case in bar:
            cand = self.cached_candidates(case, cache, fingerprint=fingerprints[id(case)])
            lab, which, n_targets = candidate_labels(cand.centers_xyz_mm, case)
            recall[part][0] += len(set(which[which >= 0].tolist()))
            recall[part][1] += n_targets
            if part == "train":
                xs.append(model_matrix(cand.features, self.config)[0][lab >= 0])
                ys.append(lab[lab >= 0].astype(np.float32))
                ws.append(_subsolid_weights(case, which, self.config.lgbm_subsolid_weight)[lab >= 0])
                semireal = str(case.series_uid).startswith(SEMIREAL_PREFIX)
                ks.append(np.full(int((lab >= 0).sum()),
                                  self.config.lgbm_semireal_weight if semireal else self.config.lgbm_twin_weight))
        x = np.concatenate(xs)
        y = np.concatenate(ys)
        w = np.concatenate(ws)
        if y.sum() == 0:
            raise BlobModelError(f"blob-lgbm: no candidate hits a target nodule in {len(train_cases)} training scans")
        params = {
            "objective": "binary", "learning_rate": self.config.lgbm_learning_rate, "num_leaves": self.config.lgbm_num_leaves,
            "min_data_in_leaf": self.config.lgbm_min_data_in_leaf, "feature_fraction": self.config.lgbm_feature_fraction,
            "lambda_l2": self.config.lgbm_lambda_l2, "extra_trees": self.config.lgbm_extra_trees, "bagging_fraction": 0.8,
            "bagging_freq": 1, "seed": self.config.seed, "deterministic": True, "num_threads": 2, "verbose": -1,
        }
        if self.config.lgbm_neg_per_pos > 0:
            params["scale_pos_weight"] = float((y == 0).sum()) / float(max(y.sum(), 1)) / self.config.lgbm_neg_per_pos
        names = model_columns(self.config)
        data = lgb.Dataset(x, y, weight=w * np.concatenate(ks), feature_name=names, free_raw_data=False)
        boosters = [lgb.train({**params, "seed": self.config.seed + k}, data, num_boost_round=self.config.lgbm_rounds)
                    for k in range(self.config.lgbm_bags)]
        files = [MODEL_FILE] + [f"blob_model.bag{k}.txt" for k in range(1, len(boosters))]
        meta = {
            "kind": "lidc-det blob-lgbm model",
            "config": asdict(self.config),
            "feature_names": names,
            "model_files": files,
            "data_key": data_key,
            "train_series_uids": uids,
            "n_candidates": int(len(y)),
            "n_positive_candidates": int(y.sum()),
            "n_subsolid_positive_candidates": int(((w != 1.0) & (y == 1)).sum()),
            "candidate_recall": {k: {"hit": v[0], "nodules": v[1], "recall": round(v[0] / v[1], 4) if v[1] else None}
                                 for k, v in recall.items()},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        out.mkdir(parents=True, exist_ok=True)
        for name, b in zip(files, boosters):
            write_text(out / name, b.model_to_string())
        write_json(out / META_FILE, meta)
        self._booster, self.meta, self.checkpoint = BoosterMean(boosters), meta, model_path
        return meta

    def cached_candidates(self, case: Any, cache_dir: str | Path, *, fingerprint: str | None = None) -> BlobCandidates:
        """The candidates of a scan (``case``: ``series_uid``, ``image_hu`` ``[z, y, x]``, ``geometry``), read
        from ``cache_dir/<candidate_key>/<uid>-<fingerprint>.npz`` when extracted before, else extracted and
        written there (atomically). The file is named by :func:`scan_fingerprint`, so other pixels under the
        same UID get another file."""
        from lidc_det.atomic import write_with

        fp = scan_fingerprint(case) if fingerprint is None else fingerprint
        path = Path(cache_dir) / self.config.candidate_key() / f"{case.series_uid}-{fp}.npz"
        if path.exists():
            with np.load(path) as z:
                return BlobCandidates(z["centres"], z["scales"], z["features"], float(z["seconds"]))
        cand = self.candidates(np.asarray(case.image_hu), case.geometry)
        path.parent.mkdir(parents=True, exist_ok=True)

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, centres=cand.centers_xyz_mm, scales=cand.scales_mm, features=cand.features, seconds=cand.seconds)

        write_with(path, save)
        return cand

    def feature_importance(self) -> dict[str, float]:
        """LightGBM gain per feature name (trained detectors only), largest first."""
        if self._booster is None:
            raise BlobModelError("blob-lgbm: not trained")
        gain = self._booster.feature_importance(importance_type="gain")
        pairs = sorted(zip(self._booster.feature_name(), gain.tolist()), key=lambda p: -p[1])
        return {k: float(v) for k, v in pairs}


class BlurredCase:
    """Copy ``k`` of a training scan, blurred as a thicker slice and a softer kernel would (``train_blur_*``).

    A Gaussian of SD ``sigma_z`` (mm, along z) and ``sigma_xy`` (mm, in plane), each drawn uniformly from
    the config's range by a generator seeded with the scan's UID and ``k`` (not the LightGBM seed, so
    models of other seeds share the cached features). Findings, ratings and geometry are the scan's;
    the image is blurred when read (a copy found in the feature cache never is). Its ``fingerprint``
    is the scan's and the draw's, so the cache file follows both.
    """

    def __init__(self, case: Any, k: int, cfg: BlobConfig, fingerprint: str) -> None:
        rng = np.random.default_rng(int(hashlib.sha1(f"{case.series_uid}/blur{k}".encode()).hexdigest()[:8], 16))
        self.case = case
        self.sigma_z_mm = float(rng.uniform(*cfg.train_blur_sigma_z_mm))
        self.sigma_xy_mm = float(rng.uniform(*cfg.train_blur_sigma_xy_mm))
        self.series_uid = f"{case.series_uid}~blur{k}"
        self.fingerprint = hashlib.sha1(f"{fingerprint}/{self.sigma_z_mm:.6f}/{self.sigma_xy_mm:.6f}".encode()).hexdigest()[:12]

    @property
    def image_hu(self) -> np.ndarray:
        """``[z, y, x]`` float32 HU, blurred (computed at each read and not kept: a fit holds every copy)."""
        from scipy.ndimage import gaussian_filter

        sz, sy, sx = self.case.geometry.spacing_zyx
        sigma = (self.sigma_z_mm / sz, self.sigma_xy_mm / sy, self.sigma_xy_mm / sx)
        return gaussian_filter(np.asarray(self.case.image_hu, dtype=np.float32), sigma, mode="nearest")

    def __getattr__(self, name: str) -> Any:  # geometry, nodules, irrelevant, boxes: the scan's own
        if name == "case":
            raise AttributeError(name)
        return getattr(self.case, name)


@dataclass(frozen=True)
class LazyCase:
    """A scan that :func:`warm_candidate_cache` sends to its worker as a recipe, not as pixels: ``load()`` (picklable,
    e.g. a module-level function under :func:`functools.partial`) returns the case (``series_uid``, ``image_hu``
    ``[z, y, x]``, ``geometry``) there, so the caller never holds the scans' images (a real DICOM series each)."""

    series_uid: str
    load: Callable[[], Any]


def warm_candidate_cache(detector_kwargs: dict[str, Any], cases: Sequence[Any], cache_dir: str | Path, *,
                         scheduler: str | None = "local", progress: bool = True) -> RunReport:
    """Extract the candidates of every scan of ``cases`` into ``cache_dir`` (as
    :meth:`BlobDetector.cached_candidates` does, so later runs read them), one task per scan on ``scheduler``
    (:func:`lidc_det.cluster.run_tasks`: ``serial``, ``local[:N]`` or a Dask address). A prepared scan travels to
    its worker as its folder and is read there, a :class:`LazyCase` is loaded there; any other case (e.g. a scan
    in memory) travels whole.
    Scans already cached are read, not extracted again, so the call is resumable. Returns the
    :class:`~lidc_det.cluster.RunReport`; raises :class:`BlobModelError` when a scan failed."""
    from lidc_det.cluster import run_tasks
    from lidc_det.data.prepared import PreparedCase

    items: dict[str, tuple[Any, ...]] = {}
    for case in cases:
        ref = (str(case.folder.parent.parent), case.series_uid) if isinstance(case, PreparedCase) else case
        items.setdefault(case.series_uid, (dict(detector_kwargs), ref, str(cache_dir)))
    report = run_tasks(_cached_candidates_task, list(items.items()), scheduler=scheduler, desc="blob-lgbm candidates",
                       progress=progress)
    failed = [f"{o.key}: {o.error}" for o in report.outcomes if not o.ok]
    if failed:
        raise BlobModelError(f"blob-lgbm: {len(failed)} scan(s) failed candidate extraction: " + "; ".join(failed[:3]))
    return report


def _cached_candidates_task(detector_kwargs: dict[str, Any], ref: Any, cache_dir: str) -> int:
    """One task of :func:`warm_candidate_cache`: the number of candidates of one scan (``ref``: a case, a
    :class:`LazyCase`, or a prepared data set's root and a series UID)."""
    if isinstance(ref, tuple):
        from lidc_det.data.prepared import PreparedDataset

        ref = PreparedDataset(ref[0]).load_case(ref[1])
    elif isinstance(ref, LazyCase):
        ref = ref.load()
    return len(BlobDetector(progress=False, **detector_kwargs).cached_candidates(ref, cache_dir))


def scan_fingerprint(case: Any) -> str:
    """A short hash of a scan's UID, geometry and image (every 4th voxel on each axis): a regenerated scan
    with other pixels under the same UID gets another fingerprint, so cached features are not reused."""
    h = hashlib.sha1(case.series_uid.encode())
    h.update(json.dumps(case.geometry.to_dict(), sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(np.asarray(case.image_hu)[::4, ::4, ::4]).tobytes())
    return h.hexdigest()[:12]


def _subsolid_weights(case: Any, which: np.ndarray, weight: float) -> np.ndarray:
    """Per candidate ``weight`` where it hits a subsolid target (texture rating <= 2), else 1. Cases
    without ratings (no ``nodules[i].characteristics``) weigh 1 throughout."""
    w = np.ones(len(which), dtype=np.float64)
    nodules = getattr(case, "nodules", None)
    if weight == 1.0 or not nodules:
        return w
    texture = np.array([float(n.characteristics.get("texture", 5.0)) for n in nodules])
    hit = which >= 0
    w[hit] = np.where(texture[which[hit]] <= 2.0, weight, 1.0)
    return w


class BoosterMean:
    """The mean of the probabilities of LightGBM boosters trained on the same features with other
    seeds (``lgbm_bags``): less seed-to-seed swing than one booster."""

    def __init__(self, boosters: Sequence[Any]) -> None:
        if not boosters:
            raise ValueError("BoosterMean needs at least one booster")
        self.boosters = list(boosters)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.mean([b.predict(x) for b in self.boosters], axis=0)

    def feature_name(self) -> list[str]:
        return list(self.boosters[0].feature_name())

    def feature_importance(self, importance_type: str = "gain") -> np.ndarray:
        return np.mean([b.feature_importance(importance_type=importance_type) for b in self.boosters], axis=0)


def load_blob_model(path: str | Path) -> tuple[BlobConfig, BoosterMean, dict[str, Any]]:
    """Config, LightGBM boosters (their mean) and training summary of a model written by
    :meth:`BlobDetector.fit`.

    ``path`` is ``blob_model.txt`` or its folder; ``blob_model.json`` and any other bag's
    ``blob_model.bag<k>.txt`` must lie beside it.

    Raises:
        BlobModelError: a file is missing, unreadable, or its features differ from this code's.
    """
    import lightgbm as lgb

    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    meta_path = p.with_name(META_FILE)
    for f in (p, meta_path):
        if not f.is_file():
            raise BlobModelError(f"{f}: no such blob-lgbm model file")
    try:
        meta = json.loads(meta_path.read_text())
        c = dict(meta["config"])
        c["hu_clip"] = tuple(c["hu_clip"])
        c["sigmas_mm"] = tuple(c["sigmas_mm"])
        c["lgbm_drop_features"] = tuple(c.get("lgbm_drop_features", ()))
        c.setdefault("branch_features", False)  # models written before these fields existed
        c.setdefault("lgbm_subsolid_weight", 1.0)
        cfg = BlobConfig(**c)
        files = [p.with_name(f) for f in meta.get("model_files", [MODEL_FILE])]
        booster = BoosterMean([lgb.Booster(model_str=f.read_text()) for f in files])
    except (OSError, ValueError, KeyError, TypeError, lgb.basic.LightGBMError) as err:
        raise BlobModelError(f"{p}: not a readable blob-lgbm model ({type(err).__name__}: {err})") from err
    if len(booster.boosters) != cfg.lgbm_bags:
        raise BlobModelError(f"{p}: {len(booster.boosters)} model files for lgbm_bags = {cfg.lgbm_bags}")
    names = model_columns(cfg)
    if booster.feature_name() != names or meta.get("feature_names") != names:
        raise BlobModelError(f"{p}: its features {booster.feature_name()[:4]}... differ from this version's")
    return cfg, booster, meta


__all__ = [
    "BlobCandidates", "BlobConfig", "BoosterMean", "BlobDetector", "BlurredCase", "BlobModelError", "FEATURE_NAMES", "candidate_labels",
    "RELATIVE_HU", "feature_names", "load_blob_model", "model_columns", "model_matrix", "scan_candidates",
]
