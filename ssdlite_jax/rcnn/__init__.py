"""The Faster R-CNN family's own parts, as torchvision's GeneralizedRCNN owns them: the anchor generator
(`anchors`), RoIAlign (`roi_align`). They build on the shared box maths and the networks below them and import
nothing above."""
