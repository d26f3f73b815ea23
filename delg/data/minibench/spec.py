"""What the embedded benchmark is made of: presets (sizes), source photographs, version and file names."""

from __future__ import annotations

from dataclasses import dataclass

from delg.errors import ProjectError

VERSION = 2  # 2: training split in GLDv2's own layout (train_clean.csv at the root, train/a/b/c/<id>.jpg)
GND_NAME = "gnd_minibench.pkl"
JPEG_QUALITY = 90


class MinibenchError(ProjectError, RuntimeError):
    """The embedded benchmark cannot be built or the target folder is not ours; the message names the path."""


@dataclass(frozen=True)
class Preset:
    """Sizes of one preset.  ``canvas`` is the facade size in pixels (width, height)."""

    long_side: int  # long side of test images
    canvas: tuple[int, int]  # test facade canvas (w, h)
    n_photo_landmarks: int  # landmarks with a photograph mural (from TEST_LANDMARK_PHOTOS)
    n_facade_landmarks: int  # pure procedural landmarks
    view_tiers: tuple[str, ...]  # database views of each landmark (one per entry, see _VIEW_TIERS)
    n_confuser_views: int  # views of the confuser scene of each landmark
    n_photo_distractors: int  # distractor scenes with a mural (from TEST_DISTRACTOR_PHOTOS)
    n_plain_distractors: int  # distractor scenes: facades of new styles
    views_per_distractor: int
    train_long_side: int
    train_canvas: tuple[int, int]
    train_classes: int
    train_per_class: int


_DEFAULT_TIERS = ("easy0", "easy1", "easyc", "zoomin", "zoomout", "tilt0", "tilt1", "rot", "night", "occl", "partial")
PRESETS: dict[str, Preset] = {
    "default": Preset(
        long_side=512, canvas=(1024, 768), n_photo_landmarks=5, n_facade_landmarks=5, view_tiers=_DEFAULT_TIERS,
        n_confuser_views=2, n_photo_distractors=5, n_plain_distractors=3, views_per_distractor=2,
        train_long_side=288, train_canvas=(576, 432), train_classes=32, train_per_class=6,
    ),
    "tiny": Preset(
        long_side=256, canvas=(512, 384), n_photo_landmarks=1, n_facade_landmarks=2,
        view_tiers=("easy0", "easy1", "zoomin", "tilt0", "night", "occl", "partial"),
        n_confuser_views=1, n_photo_distractors=1, n_plain_distractors=1, views_per_distractor=1,
        train_long_side=192, train_canvas=(384, 288), train_classes=6, train_per_class=4,
    ),
}

# Source photographs. Test and training lists are disjoint (motorcycle_left/right are two views of one scene:
# both go to training).  Entries are (package, file name); a file that is not on disk is skipped.
TEST_LANDMARK_PHOTOS = [("skimage", "astronaut.png"), ("skimage", "coffee.png"), ("skimage", "rocket.jpg"),
                        ("skimage", "chelsea.png"), ("skimage", "camera.png")]
TEST_DISTRACTOR_PHOTOS = [("skimage", "hubble_deep_field.jpg"), ("skimage", "coins.png"), ("skimage", "page.png"),
                          ("skimage", "color.png"), ("skimage", "chessboard_RGB.png")]
TRAIN_PHOTOS = [("matplotlib", "grace_hopper.jpg"), ("skimage", "motorcycle_left.png"), ("skimage", "retina.jpg"),
                ("skimage", "moon.png"), ("skimage", "ihc.png"), ("skimage", "cell.png"),
                ("skimage", "clock_motion.png"), ("skimage", "text.png"), ("skimage", "brick.png"),
                ("skimage", "grass.png"), ("skimage", "gravel.png")]
# A second real view of a training photo (a stereo pair): it joins the same training class.
TRAIN_PHOTO_PAIRS = {"skimage:motorcycle_left.png": ("skimage", "motorcycle_right.png")}

