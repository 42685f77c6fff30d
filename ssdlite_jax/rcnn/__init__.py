"""The Faster R-CNN family, as torchvision's GeneralizedRCNN owns it: the detector (`detector`, the contract of
ssdlite_jax.detector), its variants' configs (`configs`), the transform (`transform`), the anchor generator
(`anchors`), the RPN's proposals (`proposals`), RoIAlign (`roi_align`), the detections (`postprocess`) and the
training targets (`matcher`: matcher and balanced sampler). They build on the contract, the shared box maths and
the networks below them and import nothing above."""
