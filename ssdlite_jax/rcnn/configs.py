"""The Faster R-CNN family's model configs: torchvision's fasterrcnn_mobilenet_v3_large_320_fpn and
fasterrcnn_mobilenet_v3_large_fpn builders' settings (the two differ only in input size and RPN inference
settings)."""

import ml_collections


def fasterrcnn_mobilenet_v3_large_320_fpn_config() -> ml_collections.ConfigDict:
  """Low-res: min/max size 320/640, 150 RPN proposals per level and image at inference, RPN score >= 0.05."""
  c = ml_collections.ConfigDict()
  c.family = "rcnn"
  c.backbone = "mobilenet_v3_large_fpn"
  c.backbone_kwargs = ml_collections.ConfigDict(dict(width_mult=1.0, reduced_tail=False))
  c.head = "faster_rcnn"
  c.num_classes = 91
  c.class_names = ()          # label -> name ('' for unused); empty means COCO names when num_classes == 91
  c.frozen_bn = True          # FrozenBatchNorm2d (eps 1e-5) as the released weights; False: trainable BatchNorm2d
  # Backbone stages trained (0..6 of 6; the rest leave the optimizer). None: 3 with init_backbone_from (features
  # 0-6 frozen), else 6, as torchvision decides from weights_backbone; fine-tuning released weights through
  # init_from, set 3 as torchvision's weights= builders do.
  c.trainable_backbone_layers = None
  c.min_size = 320            # the transform: the short side to min_size unless the long one passes max_size
  c.max_size = 640
  c.size_divisible = 32       # the batch canvas: the largest resized image, rounded up to multiples of this
  c.image_mean = (0.485, 0.456, 0.406)
  c.image_std = (0.229, 0.224, 0.225)
  c.anchor_sizes = (32, 64, 128, 256, 512)
  c.aspect_ratios = (0.5, 1.0, 2.0)
  c.rpn_pre_nms_top_n = 150   # per level, inference (training: rpn_pre_nms_top_n_train)
  c.rpn_post_nms_top_n = 150  # per image, inference
  c.rpn_pre_nms_top_n_train = 2000
  c.rpn_post_nms_top_n_train = 2000
  c.rpn_nms_thresh = 0.7
  c.rpn_score_thresh = 0.05   # on the objectness probability, >=
  c.box_score_thresh = 0.05   # on the class probability, >
  c.box_nms_thresh = 0.5
  c.detections_per_img = 100
  c.box_coder_weights = (10.0, 10.0, 5.0, 5.0)
  c.kernels = "auto"          # as SSD's: 'cpu', 'xla' or 'auto'
  c.dtype = "float32"
  return c


def fasterrcnn_mobilenet_v3_large_fpn_config() -> ml_collections.ConfigDict:
  """High-res: min/max size 800/1333, 1000 RPN proposals per level and image at inference."""
  c = fasterrcnn_mobilenet_v3_large_320_fpn_config()
  c.min_size = 800
  c.max_size = 1333
  c.rpn_pre_nms_top_n = 1000
  c.rpn_post_nms_top_n = 1000
  return c
