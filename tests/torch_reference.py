"""torchvision reference models for parity tests (imported only by tests that need torch)."""

import numpy as np

from tests.helpers import import_or_skip


def random_torchvision_ssdlite(num_classes=91, seed=0):
  """ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None) in eval mode with randomised,
  non-degenerate BN statistics and spread-out class logits (so detection scores do not tie)."""
  torch = import_or_skip("torch")
  torchvision = import_or_skip("torchvision")
  torch.manual_seed(seed)
  model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
      weights=None, weights_backbone=None, num_classes=num_classes).eval()
  return _randomise_bn(model, 320, seed)


def _randomise_bn(model, size, seed, calibrate=lambda m, x: m.head(list(m.backbone(x).values()))):
  """`model` (an SSD, or a Faster R-CNN with calibrate=backbone only) in eval mode with random BN affine parameters,
  running statistics of a calibration batch (normalised as the model does; `calibrate(model, batch)` runs the BN
  layers on it) times a random factor on the variance, and random counters."""
  torch = import_or_skip("torch")
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  momentum = bns[0].momentum
  mean = torch.tensor(model.transform.image_mean)[:, None, None]
  std = torch.tensor(model.transform.image_std)[:, None, None]
  with torch.no_grad():
    for m in bns:
      m.weight.uniform_(0.5, 1.0)
      m.bias.uniform_(-0.5, 0.5)
      m.momentum = 1.0  # running stats := the calibration batch's, so every layer stays non-degenerate
    model.train()
    calibrate(model, (torch.from_numpy(smooth_images(4, size, size, seed).transpose(0, 3, 1, 2)) - mean) / std)
    model.eval()
    for m in bns:
      m.momentum = momentum
      m.running_var.mul_(torch.empty_like(m.running_var).uniform_(1.0, 1.5))
      m.num_batches_tracked.fill_(int(torch.randint(0, 10**6, ())))
  return model


def torch_ssd512_resnet50(seed=0):
  """SSD512-ResNet50 of torchvision's PR #3760 as models/resnet.py reconstructs it, from torchvision's parts
  (resnet50 with layer4's strides 1, 5 extra blocks with BN, SSDHead, DefaultBoxGenerator without steps), in
  eval mode with randomised BN statistics."""
  torch = import_or_skip("torch")
  torchvision = import_or_skip("torchvision")
  from torch import nn
  from torchvision.models.detection import anchor_utils, ssd

  class Extractor(nn.Module):
    def __init__(self):
      super().__init__()
      r = torchvision.models.resnet50(weights=None)
      r.layer4[0].conv2.stride = (1, 1)
      r.layer4[0].downsample[0].stride = (1, 1)
      self.features = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
      def block(cin, mid, cout, k, s, p):
        return nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                             nn.Conv2d(mid, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
      self.extra = nn.ModuleList([block(2048, 256, 512, 3, 2, 1), block(512, 256, 512, 3, 2, 1),
                                  block(512, 128, 256, 3, 2, 1), block(256, 128, 256, 3, 1, 0),
                                  block(256, 128, 256, 2, 1, 0)])

    def forward(self, x):
      out = [self.features(x)]
      for block in self.extra:
        out.append(block(out[-1]))
      return {str(i): v for i, v in enumerate(out)}

  torch.manual_seed(seed)
  anchors = anchor_utils.DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                             scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05])
  model = ssd.SSD(Extractor(), anchors, (512, 512), 91).eval()
  return _randomise_bn(model, 512, seed)


def state_dict_numpy(model):
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def to_nchw(x):
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def smooth_images(n, h, w, seed=0):
  """[n, h, w, 3] float32 in [0, 1]: smooth random fields (bilinear upsampling of coarse noise) plus noise."""
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    coarse = rs.uniform(0, 1, (h // 32 + 2, w // 32 + 2, 3))
    ys = np.linspace(0, coarse.shape[0] - 1.001, h)
    xs = np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    c = coarse
    img = ((1 - fy) * (1 - fx) * c[y0][:, x0] + (1 - fy) * fx * c[y0][:, x0 + 1]
           + fy * (1 - fx) * c[y0 + 1][:, x0] + fy * fx * c[y0 + 1][:, x0 + 1])
    out.append(np.clip(img + rs.normal(0, 0.05, img.shape), 0, 1))
  return np.stack(out).astype(np.float32)


def torch_fasterrcnn_mobilenet(variant="320", frozen_bn=True, num_classes=91, seed=0):
  """fasterrcnn_mobilenet_v3_large_320_fpn (variant '320') or _fpn ('hr') in eval mode with random weights and
  random, non-degenerate BN statistics: with frozen_bn, as the released weights build it (the builder's own parts
  with FrozenBatchNorm2d, which no download gives here), else as weights=None, weights_backbone=None builds it
  (BatchNorm2d eps 1e-5). Both layouts carry the same values."""
  torch = import_or_skip("torch")
  torchvision = import_or_skip("torchvision")
  from torchvision.models.detection import anchor_utils, faster_rcnn
  from torchvision.ops import misc
  settings = {"320": dict(min_size=320, max_size=640, rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=150,
                          rpn_score_thresh=0.05),
              "hr": dict(rpn_score_thresh=0.05)}[variant]
  builder = {"320": faster_rcnn.fasterrcnn_mobilenet_v3_large_320_fpn,
             "hr": faster_rcnn.fasterrcnn_mobilenet_v3_large_fpn}[variant]
  torch.manual_seed(seed)
  model = _randomise_bn(builder(weights=None, weights_backbone=None, num_classes=num_classes).eval(), 320, seed,
                        calibrate=lambda m, x: m.backbone(x))
  if not frozen_bn:
    return model
  backbone = faster_rcnn._mobilenet_extractor(
      torchvision.models.mobilenet_v3_large(norm_layer=misc.FrozenBatchNorm2d), True, 3)
  anchors = anchor_utils.AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
  frozen = faster_rcnn.FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **settings).eval()
  frozen.load_state_dict(model.state_dict())   # FrozenBatchNorm2d drops num_batches_tracked
  return frozen


def with_exact_hardsigmoid(model):
  """torch's Hardsigmoid backward multiplies by float32(1/6) even in float64 (3e-8 off): the SE gates become
  the same forward, relu6(x + 3) / 6, whose backward is exact."""
  torch = import_or_skip("torch")

  class ExactHardsigmoid(torch.nn.Module):
    def forward(self, x):
      return torch.nn.functional.relu6(x + 3) / 6
  for m in model.modules():
    if hasattr(m, "scale_activation"):   # torchvision's SqueezeExcitation
      m.scale_activation = ExactHardsigmoid()
  return model
