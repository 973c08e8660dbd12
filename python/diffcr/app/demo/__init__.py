"""Building blocks of the ``diffcr train`` demo: a procedural class-conditional image set
(:mod:`.data`), a small evaluation classifier (:mod:`.classifier`), a classifier-feature FID and
class accuracy (:mod:`.metrics`), and the figures (:mod:`.plots`, needs matplotlib).

Everything is deterministic given seeds, needs no download and runs in seconds on a CPU.
"""
from .classifier import ShapeClassifier, accuracy, features, predict, train_classifier
from .data import (CLASS_NAMES, NUM_CLASSES, load_image_folder, make_shapes, save_image_folder,
                   shape_masks)
from .metrics import class_accuracy, classifier_fid, frechet_distance
from .plots import plot_ratio_heatmap, plot_router_maps, plot_samples, region_labels

__all__ = [
    "CLASS_NAMES", "NUM_CLASSES", "ShapeClassifier", "accuracy", "class_accuracy",
    "classifier_fid", "features", "frechet_distance", "load_image_folder", "make_shapes",
    "plot_ratio_heatmap", "plot_router_maps", "plot_samples", "predict", "region_labels",
    "save_image_folder", "shape_masks", "train_classifier",
]
