"""The embedded benchmark ("minibench"): a small, deterministic landmark retrieval benchmark built offline.

Nothing is downloaded.  Every image comes from (a) photographs that installed packages ship on disk (the
scikit-image ``data`` folder, matplotlib's ``sample_data``) and (b) procedural scenes: synthetic building
facades (plaster/brick walls, window grids with frames, shutters and balconies, cornices, shop signs with random
text, posters, emblems, clocks, graffiti) that are rich in corners so that local features have something to match.

Scenes and views
----------------
A *landmark* is a planar scene (a facade canvas, possibly with a source photograph painted on it as a mural).
Every image of a landmark is rendered by a virtual pinhole camera looking at the plane: position, distance
(scale), roll and out-of-plane tilt (pitch/yaw up to ~55 degrees) give a plane-to-image homography ``H``
(``sources.json`` stores it).  Pixels that do not see the facade show plain "surroundings" (sky, ground), and
views may add occluders (trees, poles, vehicles, people) and photometric changes (brightness, contrast, colour
cast, blur, noise, haze, "night" gamma).  Every image is written as JPEG with a fixed quality and no metadata.

Test split (revisitop layout): ``<out>/jpg/<name>.jpg`` and ``<out>/gnd_minibench.pkl`` with ``imlist``,
``qimlist`` (queries are not in ``imlist``) and ``gnd[i] = {'bbx', 'easy', 'hard', 'junk'}`` (0-based indices
into ``imlist``; plain lists, ints and floats).  Each landmark has two queries, near-frontal views whose ``bbx``
frames a distinctive part of the facade (for photo landmarks: the mural).  Distractors (database only) are
views of other scenes: *confusers* (the same facade style as a test landmark -- palette, window type, texture --
with a different layout), other facades with murals of photographs that no landmark uses, and plain facades.

Ground truth rule (measured, not random)
----------------------------------------
For query ``q`` (homography ``H_q``, box ``bbx``) and a database view ``v`` of the *same* landmark, a regular
grid of points inside ``bbx`` is mapped to the view by ``H_v @ inv(H_q)``; points that fall outside the facade
canvas are ignored (they show surroundings, not the landmark).  We measure

- ``visible``: fraction of the grid points that land inside the view, in front of the camera and not on an
  occluder (i.e. the fraction of the query region that the view shows);
- ``visible_px``: the area (view pixels) of the visible part of the query region;
- ``scale``: median local scale of the query-to-view map (``sqrt|det J|``) over the visible points;
- ``aniso``: ratio of the singular values of ``J`` at the region centre (viewpoint / perspective change);
- ``rot``: in-plane rotation of ``J`` at the region centre (degrees);
- ``photo_level``: 0 for mild photometric change, 1 for a strong one (night, heavy blur, strong colour cast,
  heavy noise or haze).

and label the view (see :func:`label_view`)::

    junk  if visible < 0.25 or visible_px < (0.08 * long_side)^2     (barely visible, or not visible at all --
                                                                       as revisitop, views of the landmark that
                                                                       do not show the query region are junk)
    easy  if visible >= 0.7 and 1/1.5 <= scale <= 1.5 and aniso <= 1.35 and |rot| <= 25 and photo_level == 0
    hard  otherwise (partial overlap, strong scale / viewpoint / rotation / photometric change)

Views of other landmarks and distractors are negatives.  ``sources.json`` records, for every image, its split,
role, scene, source photographs and homography, plus the measured values and label of every (query, view) pair.

Training split (GLDv2 layout, as ``download_dataset.sh`` leaves GLDv2): ``<out>/train_clean.csv``
(``landmark_id,images``; ``images`` = space-separated 16-hex-digit ids) and ``<out>/train/<a>/<b>/<c>/<id>.jpg``.  Training landmarks are
other scenes: facades generated from a separate seed stream and photographs that the test split never uses
(``sources.json`` lists the source of every image; the two sets are disjoint).

Building is atomic and cached: the benchmark is written into a unique temporary sibling folder which is moved into
place at the end; ``<out>/BUILD.json`` (preset, version, file count, content checksum) is written last.  A complete
build of the same preset/version is reused; temporary folders left by killed builds (their process is gone) are
removed.  Concurrent builders each write their own temporary folder (``.<name>.tmp-<host>-<pid>-<random>``); the
first to finish moves its build into place and the others, finding a complete identical build, discard theirs.
A non-empty ``out`` without ``BUILD.json`` is never deleted (an error asks for ``force``).

    root = build(Path("datasets/minibench/tiny"), preset="tiny")
    root = ensure_built(conf)   # conf.dataset.root or <repo>/datasets/minibench/<conf.dataset.preset>

Modules: :mod:`.spec` (presets, photographs, version), :mod:`.render` (pixels), :mod:`.geometry` (cameras and the
ground-truth rule), :mod:`.views` (view tiers), :mod:`.generate` (the content, written through
:func:`delg.data.revisitop.write_gnd` and :mod:`delg.data.gldv2_layout`), :mod:`.build` (atomic, cached build).
The names below stay importable from ``delg.data.minibench``.
"""

from delg.data.minibench.build import build, content_checksum, default_root, ensure_built, read_build_info
from delg.data.minibench.geometry import (
    EASY_ANISO,
    EASY_ROT,
    EASY_SCALE,
    EASY_VISIBLE,
    JUNK_MIN_SIDE,
    JUNK_VISIBLE,
    camera_homography,
    label_view,
    measure_overlap,
)
from delg.data.minibench.render import (
    PHOTOMETRIC_STRONG,
    _render_view,
    available_photos,
    facade_style,
    render_facade,
)
from delg.data.minibench.spec import GND_NAME, JPEG_QUALITY, PRESETS, VERSION, MinibenchError, Preset
from delg.data.minibench.views import Scene

__all__ = [
    "EASY_ANISO", "EASY_ROT", "EASY_SCALE", "EASY_VISIBLE", "GND_NAME", "JPEG_QUALITY", "JUNK_MIN_SIDE",
    "JUNK_VISIBLE", "PHOTOMETRIC_STRONG", "PRESETS", "VERSION", "MinibenchError", "Preset", "Scene",
    "_render_view", "available_photos", "build", "camera_homography", "content_checksum", "default_root",
    "ensure_built", "facade_style", "label_view", "measure_overlap", "read_build_info", "render_facade",
]
