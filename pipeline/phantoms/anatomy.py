"""Synthetic CT anatomy on a RAS+ voxel grid: the geometry half of the phantom generator.

Everything here lives in the RAS+ world (+x = patient Right, +y = Anterior, +z = Superior, mm)
on a voxel grid ``A[i, j, k]`` whose index i grows toward Right, j toward Anterior, k toward
Superior, mapped to world mm by the diagonal affine :attr:`PatientSpec.affine` (voxel centres).
:mod:`pipeline.phantoms.studies` turns a :class:`Phantom` into DICOM slices and a NIfTI label map.

All randomness comes from ``numpy.random.default_rng([seed, index, stream])``, so one patient
depends only on (seed, patient index), never on how many patients a collection has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABELS: dict[int, str] = {
    1: "body",
    2: "lung_left",
    3: "lung_right",
    4: "liver",
    5: "spleen",
    6: "kidney_left",
    7: "kidney_right",
    8: "spine",
    9: "aorta",
    10: "lung_nodule",
    11: "liver_mass",
    12: "kidney_mass",
}
LABEL_VALUES: dict[str, int] = {name: value for value, name in LABELS.items()}
# Painting order of the organs (later wins where they touch); lesions are painted after them.
ORGANS: tuple[str, ...] = tuple(LABELS[v] for v in range(2, 10))
LESION_HOSTS: dict[str, tuple[str, ...]] = {
    "lung_nodule": ("lung_left", "lung_right"),
    "liver_mass": ("liver",),
    "kidney_mass": ("kidney_left", "kidney_right"),
}
LESION_DIAMETER_MM: dict[str, tuple[float, float]] = {
    "lung_nodule": (5.0, 30.0),
    "liver_mass": (10.0, 45.0),
    "kidney_mass": (10.0, 30.0),
}
STREAM_SPEC, STREAM_LESIONS, STREAM_NOISE = 1, 2, 3


def patient_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The seeded generator of one (seed, patient index, stream) triple."""
    return np.random.default_rng([int(seed), int(index), int(stream)])


@dataclass(frozen=True)
class Shape:
    """A solid in RAS+ mm: ``"ellipsoid"``, or ``"cylinder"`` (elliptic, axis along z, flat ends).

    ``centre`` and ``semi`` (semi-axes along x, y, z) are in mm.
    """

    kind: str
    centre: tuple[float, float, float]
    semi: tuple[float, float, float]


@dataclass(frozen=True)
class PatientSpec:
    """Seeded acquisition and body parameters of one patient.

    ``shape`` is (X, Y, Z) voxels, ``spacing`` (X, Y, Z) mm, ``origin`` the RAS+ mm position of
    voxel (0, 0, 0); ``body_offset`` the (x, y) mm shift of the body axis from the grid centre.
    """

    seed: int
    index: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    contrast: bool
    size: float
    noise_sigma: float
    body_offset: tuple[float, float]

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) float64 voxel (i, j, k) → RAS+ mm; diagonal, positive spacings."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """RAS+ mm of the voxel centres along each axis: (X,), (Y,), (Z,) float64, ascending."""
        return tuple(
            o + s * np.arange(n)
            for o, s, n in zip(self.origin, self.spacing, self.shape, strict=True)
        )

    @property
    def body_centre(self) -> tuple[float, float, float]:
        """RAS+ mm of the body axis at mid-height (x, y of the body cylinder, z of the grid)."""
        (xs, ys, zs), (dx, dy) = self.axes(), self.body_offset
        return (float(xs.mean() + dx), float(ys.mean() + dy), float(zs.mean()))


@dataclass(frozen=True)
class Lesion:
    """A spherical lesion: RAS+ mm centre (a voxel centre), diameter mm, density HU."""

    label: str
    centre: tuple[float, float, float]
    diameter: float
    density: float
    organ: str
    side: str

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "label_value": LABEL_VALUES[self.label],
            "centre_ras_mm": [round(c, 4) for c in self.centre],
            "diameter_mm": round(self.diameter, 3),
            "density_hu": round(self.density, 1),
            "side": self.side,
            "organ": self.organ,
        }


@dataclass
class Phantom:
    """One generated patient.

    Attributes:
        spec: the acquisition parameters (grid, spacing, contrast, ...).
        hu: (X, Y, Z) float32 Hounsfield units with noise, RAS+ voxel grid of ``spec.affine``.
        labels: (X, Y, Z) int16 label map (values of :data:`LABELS`, 0 = air), same grid.
        organs: organ name → its :class:`Shape` (RAS+ mm).
        lesions: the lesions painted into ``hu`` and ``labels``.
    """

    spec: PatientSpec
    hu: np.ndarray
    labels: np.ndarray
    organs: dict[str, Shape]
    lesions: list[Lesion]

    def truth(self) -> dict:
        """Ground truth as a JSON-ready dict (no identifying values)."""
        s = self.spec
        return {
            "patient_index": s.index,
            "seed": s.seed,
            "frame": "RAS+ voxel grid (X, Y, Z) of the label map; mm are RAS+ world mm",
            "shape": list(s.shape),
            "spacing": [round(v, 6) for v in s.spacing],
            "affine": [[round(float(v), 6) for v in row] for row in s.affine],
            "contrast": s.contrast,
            "noise_sigma_hu": round(s.noise_sigma, 3),
            "body_centre_ras_mm": [round(c, 4) for c in s.body_centre],
            "organs": {name: LABEL_VALUES[name] for name in ("body", *ORGANS)},
            "organ_hu": {k: round(v, 1) for k, v in organ_hu(s.contrast).items()},
            "lesions": [lesion.to_json() for lesion in self.lesions],
        }


def sample_spec(seed: int, index: int, matrix: int = 160) -> PatientSpec:
    """Draw the grid, spacing, contrast and body size of patient ``index``.

    In-plane spacing 0.7–0.9 mm on a ``matrix``² grid; slice spacing one of 2.5/3/3.75/5 mm with
    40–64 slices covering about 150–200 mm.
    """
    r = patient_rng(seed, index, STREAM_SPEC)
    pixel = round(float(r.uniform(0.7, 0.9)), 4)
    thickness = float(r.choice([2.5, 3.0, 3.75, 5.0]))
    nz = int(np.clip(round(float(r.uniform(150.0, 200.0)) / thickness), 40, 64))
    half = (matrix - 1) / 2 * pixel
    origin = (
        -half,
        round(float(r.uniform(-10.0, 10.0)), 2) - half,
        -round(float(r.uniform(80.0, 300.0)), 2),
    )
    return PatientSpec(
        seed=int(seed),
        index=int(index),
        shape=(matrix, matrix, nz),
        spacing=(pixel, pixel, thickness),
        origin=origin,
        contrast=bool(r.random() < 0.5),
        size=float(r.uniform(0.85, 1.0)),
        noise_sigma=float(r.uniform(8.0, 12.0)),
        body_offset=(float(r.uniform(-4.0, 4.0)), float(r.uniform(-6.0, 2.0))),
    )


def organ_hu(contrast: bool) -> dict[str, float]:
    """Mean HU of each structure (``"fat"`` = subcutaneous ring, ``"air"`` = outside)."""
    return {
        "air": -1000.0,
        "body": 40.0,
        "fat": -100.0,
        "lung_left": -850.0,
        "lung_right": -850.0,
        "liver": 100.0 if contrast else 60.0,
        "spleen": 110.0 if contrast else 50.0,
        "kidney_left": 140.0 if contrast else 30.0,
        "kidney_right": 140.0 if contrast else 30.0,
        "spine": 700.0,
        "aorta": 200.0 if contrast else 40.0,
    }


def organ_shapes(spec: PatientSpec) -> dict[str, Shape]:
    """Body and organ solids in RAS+ mm, scaled to the field of view and the body size.

    Lungs upper, liver right (+x), spleen left, kidneys low and posterior, spine posterior
    midline, aorta anterior-left (−x, +y) of the spine.
    """
    xs, ys, zs = spec.axes()
    bx, by, zmid = spec.body_centre
    ax = 0.90 * spec.size * (xs[-1] - xs[0]) / 2
    ay = 0.78 * spec.size * (ys[-1] - ys[0]) / 2
    zlo, length = zs[0], zs[-1] - zs[0]

    def at(fx: float, fy: float, fz: float) -> tuple[float, float, float]:
        return (bx + fx * ax, by + fy * ay, zlo + fz * length)

    spine_r, aorta_r = 0.16 * ay, 0.10 * ay
    spine_fy = -0.68
    aorta_fy = spine_fy + (spine_r + aorta_r) / ay + 0.04
    return {
        "body": Shape("cylinder", (bx, by, zmid), (ax, ay, length)),
        "lung_left": Shape(
            "ellipsoid", at(-0.45, -0.05, 0.72), (0.34 * ax, 0.60 * ay, 0.24 * length)
        ),
        "lung_right": Shape(
            "ellipsoid", at(0.45, -0.05, 0.72), (0.34 * ax, 0.60 * ay, 0.24 * length)
        ),
        "liver": Shape("ellipsoid", at(0.40, 0.12, 0.33), (0.50 * ax, 0.58 * ay, 0.15 * length)),
        "spleen": Shape("ellipsoid", at(-0.55, -0.25, 0.36), (0.22 * ax, 0.30 * ay, 0.10 * length)),
        "kidney_left": Shape(
            "ellipsoid", at(-0.38, -0.48, 0.15), (0.16 * ax, 0.22 * ay, 0.09 * length)
        ),
        "kidney_right": Shape(
            "ellipsoid", at(0.38, -0.48, 0.15), (0.16 * ax, 0.22 * ay, 0.09 * length)
        ),
        "spine": Shape("cylinder", at(0.0, spine_fy, 0.5), (spine_r, spine_r, length)),
        "aorta": Shape("cylinder", at(-0.12, aorta_fy, 0.5), (aorta_r, aorta_r, 0.45 * length)),
    }


def shape_mask(shape: Shape, axes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """(X, Y, Z) bool mask of the voxel centres inside ``shape`` on the grid of ``axes``."""
    out = np.zeros(tuple(len(a) for a in axes), dtype=bool)
    box, rel = [], []
    for c, a, v in zip(shape.centre, shape.semi, axes, strict=True):
        lo, hi = np.searchsorted(v, c - a, "left"), np.searchsorted(v, c + a, "right")
        if lo >= hi:
            return out
        box.append(slice(lo, hi))
        rel.append((v[lo:hi] - c) / a)
    q = rel[0][:, None, None] ** 2 + rel[1][None, :, None] ** 2
    if shape.kind == "ellipsoid":
        out[tuple(box)] = (q + rel[2][None, None, :] ** 2) <= 1.0
    else:
        out[tuple(box)] = np.broadcast_to(q <= 1.0, tuple(s.stop - s.start for s in box))
    return out


def _lesion_density(kind: str, contrast: bool, r: np.random.Generator) -> float:
    if kind == "lung_nodule":
        return float(r.uniform(0.0, 60.0))
    if kind == "liver_mass":
        if r.random() < 0.25:  # hyperdense (e.g. haemangioma, hypervascular metastasis)
            return organ_hu(contrast)["liver"] + float(r.uniform(40.0, 80.0))
        return float(r.uniform(15.0, 35.0))
    return float(r.uniform(15.0, 70.0))


def _place(spec: PatientSpec, host: Shape, radius: float, r: np.random.Generator) -> tuple:
    """A voxel-centre position (index, RAS mm) where a sphere of ``radius`` fits in ``host``."""
    u = r.standard_normal(3)
    u *= r.random() ** (1 / 3) / np.linalg.norm(u)
    room = np.maximum(np.asarray(host.semi) - radius, 0.0) * 0.9
    target = np.asarray(host.centre) + u * room
    idx = np.clip(
        np.round((target - spec.origin) / spec.spacing).astype(int), 0, np.asarray(spec.shape) - 1
    )
    return tuple(int(i) for i in idx), tuple(
        float(v) for v in spec.origin + idx * np.asarray(spec.spacing)
    )


def _try_lesion(
    spec: PatientSpec,
    organs: dict[str, Shape],
    organ_labels: np.ndarray,
    others: list[Lesion],
    r: np.random.Generator,
) -> Lesion | None:
    """Draw one lesion and up to 30 positions for it; None when none is free."""
    kind = str(r.choice(list(LESION_HOSTS), p=[0.5, 0.38, 0.12]))
    organ = str(r.choice(LESION_HOSTS[kind]))
    host = organs[organ]
    lo, hi = LESION_DIAMETER_MM[kind]
    diameter = min(float(r.uniform(lo, hi)), 1.6 * min(host.semi))
    density = _lesion_density(kind, spec.contrast, r)
    gap = max(spec.spacing) * 2
    for _try in range(30):
        idx, centre = _place(spec, host, diameter / 2, r)
        clear = all(
            np.linalg.norm(np.subtract(centre, o.centre)) > (diameter + o.diameter) / 2 + gap
            for o in others
        )
        if clear and organ_labels[idx] == LABEL_VALUES[organ]:
            side = "right" if centre[0] > spec.body_centre[0] else "left"
            return Lesion(kind, centre, diameter, density, organ, side)
    return None


def sample_lesions(
    spec: PatientSpec, organs: dict[str, Shape], organ_labels: np.ndarray
) -> list[Lesion]:
    """2–6 non-overlapping spherical lesions, each centred on a voxel of its host organ.

    ``organ_labels`` is the (X, Y, Z) int16 RAS+ label map before lesions are painted; a centre
    is only accepted where it carries the host organ's label. Diameters are shrunk to fit the
    host; a lesion that finds no free place is redrawn (up to 20 extra draws).
    """
    r = patient_rng(spec.seed, spec.index, STREAM_LESIONS)
    target = int(r.integers(2, 7))
    lesions: list[Lesion] = []
    for _draw in range(target + 20):
        if len(lesions) == target:
            break
        lesion = _try_lesion(spec, organs, organ_labels, lesions, r)
        if lesion is not None:
            lesions.append(lesion)
    return lesions


def build_phantom(spec: PatientSpec) -> Phantom:
    """Paint body, organs and lesions (lesion > organ > body), then add seeded Gaussian noise."""
    axes = spec.axes()
    hu_of = organ_hu(spec.contrast)
    organs = organ_shapes(spec)
    labels = np.zeros(spec.shape, dtype=np.int16)
    hu = np.full(spec.shape, hu_of["air"], dtype=np.float32)
    body = organs["body"]
    inner = Shape(body.kind, body.centre, (body.semi[0] * 0.9, body.semi[1] * 0.88, body.semi[2]))
    body_mask = shape_mask(body, axes)
    labels[body_mask] = LABEL_VALUES["body"]
    hu[body_mask] = hu_of["fat"]
    hu[shape_mask(inner, axes)] = hu_of["body"]
    for name in ORGANS:
        mask = shape_mask(organs[name], axes) & body_mask
        labels[mask] = LABEL_VALUES[name]
        hu[mask] = hu_of[name]
    lesions = sample_lesions(spec, organs, labels)
    for lesion in lesions:
        mask = shape_mask(Shape("ellipsoid", lesion.centre, (lesion.diameter / 2,) * 3), axes)
        labels[mask] = LABEL_VALUES[lesion.label]
        hu[mask] = lesion.density
    noise = patient_rng(spec.seed, spec.index, STREAM_NOISE).standard_normal(
        spec.shape, dtype=np.float32
    )
    hu += noise * np.float32(spec.noise_sigma)
    return Phantom(spec=spec, hu=hu, labels=labels, organs=organs, lesions=lesions)
