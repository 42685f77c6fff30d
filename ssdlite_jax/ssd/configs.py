"""The SSD family's model configs: torchvision's builders' settings, one function per variant (ssdlite_jax.zoo
names them)."""

import ml_collections


def ssdlite320_config() -> ml_collections.ConfigDict:
  """SSDlite320-MobileNetV3-Large exactly as torchvision's ssdlite320_mobilenet_v3_large(weights=None,
  weights_backbone=None): 91 COCO classes, 320x320 input, [-1, 1] scaling, post-processing defaults."""
  c = ml_collections.ConfigDict()
  c.family = "ssd"
  c.backbone = "mobilenet_v3_large"
  c.backbone_kwargs = ml_collections.ConfigDict(
      dict(width_mult=1.0, reduced_tail=True, min_depth=16, extra_depths=(512, 256, 256, 128)))
  c.head = "ssdlite"
  c.num_classes = 91
  c.class_names = ()          # label -> name ('' for unused); empty means COCO names when num_classes == 91
  c.image_size = 320
  c.image_mean = (0.5, 0.5, 0.5)
  c.image_std = (0.5, 0.5, 0.5)
  c.anchors = ml_collections.ConfigDict(dict(
      aspect_ratios=((2, 3),) * 6, min_ratio=0.2, max_ratio=0.95, scales=(), steps=(), clip=True))
  c.box_coder_weights = (10.0, 10.0, 5.0, 5.0)
  c.score_thresh = 0.001
  c.nms_thresh = 0.55
  c.topk_candidates = 300
  c.detections_per_img = 300
  c.kernels = "auto"          # 'cpu' (ssdlite_jax.kernels), 'xla' (plain XLA ops), 'auto': 'cpu' on CPU only
  # Compute dtype; params stay float32. 'float64' (params too; needs jax_enable_x64) is for numerical checks.
  c.dtype = "float32"
  return c


def ssd300_vgg16_config() -> ml_collections.ConfigDict:
  """SSD300-VGG16 exactly as torchvision's ssd300_vgg16(weights=None, weights_backbone=None): 300x300 input as
  [0, 255] RGB minus the ImageNet mean (std 1/255), 8,732 anchors on steps 8..300, its post-processing."""
  c = ssdlite320_config()
  c.backbone = "vgg16"
  c.backbone_kwargs = ml_collections.ConfigDict(dict(highres=False))
  c.head = "ssd"
  c.image_size = 300
  c.image_mean = (0.48235, 0.45882, 0.40784)
  c.image_std = (1.0 / 255.0,) * 3
  c.anchors = ml_collections.ConfigDict(dict(
      aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)), min_ratio=0.2, max_ratio=0.95,
      scales=(0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05), steps=(8, 16, 32, 64, 100, 300), clip=True))
  c.score_thresh = 0.01
  c.nms_thresh = 0.45
  c.topk_candidates = 400
  c.detections_per_img = 200
  return c


def ssd512_vgg16_config() -> ml_collections.ConfigDict:
  """SSD512-VGG16 as torchvision's own parts build it (it ships no builder): _vgg_extractor(highres=True), 7 maps
  (64, 32, 16, 8, 6, 4, 1 at 512 px), SSDHead with 4, 6, 6, 6, 4, 4, 4 anchors per location (37,075,166
  parameters, the blog's 37.08 M; 24,660 anchors). Scales 0.07..1.2 on the feature-map grid (no steps) follow
  the one surviving copy of the unreleased builder: torchvision never published them."""
  c = ssd300_vgg16_config()
  c.backbone_kwargs.highres = True
  c.image_size = 512
  c.anchors.aspect_ratios = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,), (2,))
  c.anchors.scales = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05, 1.2)
  c.anchors.steps = ()
  return c


def ssd512_resnet50_config() -> ml_collections.ConfigDict:
  """SSD512-ResNet50 of torchvision's unmerged PR #3760 (30.2 COCO AP there), as reconstructed in
  models/resnet.py: 42,704,482 parameters, 6,132 anchors (SSD300's ratios and scales on the 32..1 grid, no
  steps), ImageNet mean/std on [0, 1] input (the SSD class's defaults), SSD's post-processing."""
  c = ssd300_vgg16_config()
  c.backbone = "resnet50"
  c.backbone_kwargs = ml_collections.ConfigDict()
  c.image_size = 512
  c.image_mean = (0.485, 0.456, 0.406)
  c.image_std = (0.229, 0.224, 0.225)
  c.anchors.steps = ()
  return c
