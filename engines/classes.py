"""ImageNet-1k class set behind the ``food`` heatmap profile, and the class labels for humans.

(The ``generic`` profile uses no classes: it is the feature map's RMS, see engines/graph.py.)

The ``food`` profile pools class-activation maps over classes that mark "the dish" in a
recipe photo. Edible classes alone are not enough: ImageNet has few prepared dishes, and on
a plated meal the classifier often votes for the vessel (plate, soup bowl, frying pan, cup),
which sits exactly where the food is. So the set is:

* prepared food, produce and drinks: 924-969 without 958 (hay), plus corn (987, 998), the
  mushroom class 947 is already inside that range;
* cooked-seafood look-alikes (crab, lobster, crayfish): on a plate they *are* the dish;
* vessels that hold the food: plate, cup, mug, bowls, pans, pots, wok, tray, colander, glasses.

Left out on purpose: scene classes (restaurant, dining table, bakery, grocery store), whose
activation covers the whole table and would flatten the map; utensils and appliances beside
the dish (spatula, ladle, wooden spoon, teapot, espresso maker), which a crop should not chase.

Labels are the standard ImageNet-1k class names as listed by torchvision (BSD-3-Clause),
copied into ``imagenet_labels.json`` so nothing is fetched at run time.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

NUM_CLASSES = 1000

FOOD_ITEMS: tuple[int, ...] = (
    *range(924, 958),  # guacamole ... pomegranate (prepared food, vegetables, fruit)
    *range(959, 968),  # carbonara ... espresso (958 is hay)
    969,  # eggnog
    987,  # corn
    998,  # ear (corn cob)
)
SEAFOOD: tuple[int, ...] = (118, 122, 123, 124)  # Dungeness crab, lobsters, crayfish
DISHWARE: tuple[int, ...] = (
    923,  # plate
    968,  # cup
    504,  # coffee mug
    659,  # mixing bowl
    809,  # soup bowl
    567,  # frying pan
    909,  # wok
    544,  # Dutch oven
    469,  # caldron
    868,  # tray
    828,  # strainer (colander of pasta or greens)
    441,  # beer glass
    572,  # goblet
)

# The classes the `food` profile and `food_mass` use, sorted and unique (graph constant order).
FOOD_CLASSES: tuple[int, ...] = tuple(sorted({*FOOD_ITEMS, *SEAFOOD, *DISHWARE}))

LABELS_FILE = Path(__file__).with_name("imagenet_labels.json")


@functools.cache
def labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names, index = class id."""
    names = json.loads(LABELS_FILE.read_text(encoding="utf-8"))
    if not (isinstance(names, list) and len(names) == NUM_CLASSES):
        raise ValueError(f"{LABELS_FILE} must list {NUM_CLASSES} class names")
    return tuple(str(name) for name in names)


def label(class_id: int) -> str:
    """Short human label of one class id (for the CLI and debug output)."""
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class id must be in [0, {NUM_CLASSES}), got {class_id}")
    return labels()[class_id]
