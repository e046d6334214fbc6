"""Class names, colour maps and label lookup tables of the three benchmarks.

Every table here maps a *source* label value (what the official files store) to a *target* class
index in ``[0, K)`` or to :data:`IGNORE` (255). Lookup tables are 256-entry ``uint8`` arrays so a
whole label image is converted with one fancy-indexing operation: ``lut[label_png]``.

COCO-Stuff-27
    The stuff+thing PNGs (``stuffthingmaps_trainval2017``) hold fine ids 0..181 (0 = person,
    181 = wood, i.e. the official 1-based COCO-Stuff ids minus one) and 255 = unlabeled. The 27
    coarse classes are the COCO-Stuff super-categories: 12 "things" super-categories followed by 15
    "stuff" super-categories, in the order used by IIC and STEGO. The fine -> coarse table is
    *derived* from the official hierarchy below (each fine name appears under exactly one parent),
    not typed in as numbers, so a typo cannot silently move one class.
Cityscapes-27
    ``*_gtFine_labelIds.png`` hold the official label ids 0..33 (the license plate, id -1, is never
    drawn into the id images by cityscapesScripts' ``json2labelImg``). Ids 7..33 are the 27 classes
    (``id - 7``); ids 0..6 (unlabeled, ego vehicle, rectification border, out of roi, static,
    dynamic, ground) and anything above 33 become ignore.
Potsdam-3
    IIC's preprocessed tiles hold the six ISPRS classes 0..5 (impervious surfaces, building, low
    vegetation, tree, car, clutter); they are merged into roads & cars, buildings & clutter and
    vegetation. Every other value becomes ignore.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255
"""Label value of pixels that count for no class (void / unlabeled / out of the class set)."""


@dataclass(frozen=True, kw_only=True)
class DatasetClasses:
    """Names and display colours of a dataset's target classes.

    Attributes:
        name: dataset name as used by ``dist-seg prepare``.
        class_names: one name per class index.
        colors: one RGB triple (0..255) per class index.
    """

    name: str
    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def palette(self) -> np.ndarray:
        """``[256, 3]`` uint8 colour table; unknown values and :data:`IGNORE` are black."""
        table = np.zeros((256, 3), dtype=np.uint8)
        table[: self.num_classes] = np.asarray(self.colors, dtype=np.uint8)
        return table


def _lut(mapping: dict[int, int]) -> np.ndarray:
    """256-entry uint8 lookup table, :data:`IGNORE` everywhere ``mapping`` says nothing."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for source, target in mapping.items():
        lut[source] = target
    lut.setflags(write=False)
    return lut


# ------------------------------------------------------------------------------------- COCO-Stuff
COCOSTUFF_FINE_NAMES: tuple[str, ...] = (
    # things (0..90; 11 of them were dropped from COCO detection but keep their ids)
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack",
    "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "hair brush",
    # stuff (91..181)
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other",
    "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)  # fmt: skip

# The COCO-Stuff label hierarchy (super-category -> fine labels), in coarse-index order:
# the 12 thing super-categories, then the 15 stuff super-categories. "food"/"furniture" exist on
# both sides of the hierarchy; the stuff ones carry COCO-Stuff's "-stuff" suffix.
COCOSTUFF_HIERARCHY: dict[str, tuple[str, ...]] = {
    "electronic": ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone"),
    "appliance": ("microwave", "oven", "toaster", "sink", "refrigerator", "blender"),
    "food": ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
             "donut", "cake"),
    "furniture": ("chair", "couch", "potted plant", "bed", "mirror", "dining table", "window",
                  "desk", "toilet", "door"),
    "indoor": ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
               "hair brush"),
    "kitchen": ("bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl"),
    "accessory": ("hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie",
                  "suitcase"),
    "animal": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
               "giraffe"),
    "outdoor": ("traffic light", "fire hydrant", "street sign", "stop sign", "parking meter",
                "bench"),
    "person": ("person",),
    "sports": ("frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
               "baseball glove", "skateboard", "surfboard", "tennis racket"),
    "vehicle": ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"),
    "ceiling": ("ceiling-tile", "ceiling-other"),
    "floor": ("carpet", "floor-tile", "floor-wood", "floor-marble", "floor-stone", "floor-other"),
    "food-stuff": ("fruit", "salad", "vegetable", "food-other"),
    "furniture-stuff": ("door-stuff", "desk-stuff", "table", "shelf", "cabinet", "cupboard",
                        "mirror-stuff", "counter", "light", "stairs", "furniture-other"),
    "raw-material": ("cardboard", "paper", "plastic", "metal"),
    "textile": ("rug", "mat", "towel", "napkin", "clothes", "cloth", "curtain", "blanket", "pillow",
                "banner", "textile-other"),
    "wall": ("wall-tile", "wall-panel", "wall-wood", "wall-brick", "wall-stone", "wall-concrete",
             "wall-other"),
    "window": ("window-blind", "window-other"),
    "building": ("house", "skyscraper", "bridge", "tent", "roof", "building-other"),
    "ground": ("sand", "snow", "dirt", "mud", "gravel", "road", "pavement", "railroad", "platform",
               "playingfield", "ground-other"),
    "plant": ("grass", "tree", "bush", "leaves", "flower", "branch", "moss", "straw",
              "plant-other"),
    "sky": ("clouds", "sky-other"),
    "solid": ("wood", "rock", "stone", "mountain", "hill", "solid-other"),
    "structural": ("fence", "cage", "net", "railing", "structural-other"),
    "water": ("fog", "river", "sea", "waterdrops", "water-other"),
}  # fmt: skip

COCOSTUFF27_NUM_THINGS = 12
"""Coarse classes ``[0, 12)`` are things, ``[12, 27)`` stuff (STEGO's ``first_stuff_index``)."""


def _cocostuff_fine_to_coarse() -> dict[int, int]:
    fine_index = {name: i for i, name in enumerate(COCOSTUFF_FINE_NAMES)}
    table: dict[int, int] = {}
    for coarse, children in enumerate(COCOSTUFF_HIERARCHY.values()):
        for child in children:
            fine = fine_index[child]
            if fine in table:  # pragma: no cover - guarded by the module-level assertion below
                raise AssertionError(f"COCO-Stuff fine class {child!r} has two parents")
            table[fine] = coarse
    return table


COCOSTUFF_FINE_TO_COARSE: dict[int, int] = _cocostuff_fine_to_coarse()
"""Fine id (0..181, as stored in the stuffthingmaps PNGs) -> coarse class (0..26)."""

assert len(COCOSTUFF_FINE_NAMES) == 182, "COCO-Stuff has 182 fine ids (0..181)"
assert sorted(COCOSTUFF_FINE_TO_COARSE) == list(range(182)), "every fine id needs one parent"

COCOSTUFF27_LUT = _lut(COCOSTUFF_FINE_TO_COARSE)
"""``COCOSTUFF27_LUT[fine_png]`` -> coarse label; 255 (unlabeled) stays 255."""


def _bit_interleaved_palette(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map: bits of the index spread over R, G, B from the top bit down."""
    colors = []
    for index in range(n):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colors.append((r, g, b))
    return colors


# PASCAL colours 1..27: the palette STEGO's figures use, shifted by one so that no class is black
# (black is what ignored pixels look like in an overlay).
COCOSTUFF27 = DatasetClasses(
    name="cocostuff27",
    class_names=tuple(COCOSTUFF_HIERARCHY),
    colors=tuple(_bit_interleaved_palette(28)[1:]),
)

# ------------------------------------------------------------------------------------- Cityscapes
CITYSCAPES_FIRST_ID = 7
CITYSCAPES_LAST_ID = 33

# (name, official colour) for label ids 7..33 (cityscapesScripts ``helpers/labels.py``).
_CITYSCAPES = (
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("parking", (250, 170, 160)),
    ("rail track", (230, 150, 140)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("guard rail", (180, 165, 180)),
    ("bridge", (150, 100, 100)),
    ("tunnel", (150, 120, 90)),
    ("pole", (153, 153, 153)),
    ("polegroup", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("caravan", (0, 0, 90)),
    ("trailer", (0, 0, 110)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)
assert len(_CITYSCAPES) == CITYSCAPES_LAST_ID - CITYSCAPES_FIRST_ID + 1

CITYSCAPES27 = DatasetClasses(
    name="cityscapes27",
    class_names=tuple(name for name, _ in _CITYSCAPES),
    colors=tuple(color for _, color in _CITYSCAPES),
)

CITYSCAPES27_LUT = _lut(
    {i: i - CITYSCAPES_FIRST_ID for i in range(CITYSCAPES_FIRST_ID, CITYSCAPES_LAST_ID + 1)}
)
"""``CITYSCAPES27_LUT[label_id_png]`` -> ``id - 7`` for ids 7..33, else 255."""

# ---------------------------------------------------------------------------------------- Potsdam
POTSDAM_FINE_NAMES = ("impervious surfaces", "building", "low vegetation", "tree", "car", "clutter")
"""The six ISPRS classes, in the index order of IIC's preprocessed ``gt`` arrays."""

POTSDAM_FINE_TO_COARSE: dict[int, int] = {
    0: 0, 4: 0,  # impervious surfaces (roads) and cars
    1: 1, 5: 1,  # buildings and clutter
    2: 2, 3: 2,  # low vegetation and trees
}  # fmt: skip

# Colours: the ISPRS legend colour of the first member of each merged class.
POTSDAM3 = DatasetClasses(
    name="potsdam3",
    class_names=("roads and cars", "buildings and clutter", "vegetation"),
    colors=((255, 255, 255), (0, 0, 255), (0, 255, 0)),
)

POTSDAM3_LUT = _lut(POTSDAM_FINE_TO_COARSE)
"""``POTSDAM3_LUT[gt]`` -> merged class; values other than 0..5 become 255."""

DATASETS: dict[str, DatasetClasses] = {d.name: d for d in (COCOSTUFF27, CITYSCAPES27, POTSDAM3)}


def dataset_classes(name: str) -> DatasetClasses:
    """Class names and colours of a benchmark by its ``dist-seg prepare`` name.

    Raises:
        KeyError: with the known names, if ``name`` is not one of them.
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None

# ------------------------------------------------------------------------------------- PASCAL VOC
VOC12_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

VOC12 = DatasetClasses(
    name="voc12",
    class_names=VOC12_CLASS_NAMES,
    colors=tuple(_bit_interleaved_palette(21)),  # the official VOC palette: index k has colour k
)

VOC12_LUT = _lut({k: k for k in range(21)})
"""``VOC12_LUT[palette_index_png]``: ids 0..20 unchanged; 255 (void, object borders) and anything else -> 255."""
