"""Input pipelines: COCO 2017 (TFDS), any COCO-format folder, and an embedded synthetic dataset.

Submodules are imported explicitly (`from ssdlite_jax.data import pipeline`) so that code needing only
label metadata (`coco_labels`) does not load TensorFlow.
"""
