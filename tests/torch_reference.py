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
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in bns:
      m.weight.uniform_(0.5, 1.0)
      m.bias.uniform_(-0.5, 0.5)
      m.momentum = 1.0  # running stats := the calibration batch's, so every layer stays non-degenerate
    model.train()
    calib = torch.from_numpy(smooth_images(4, 320, 320, seed).transpose(0, 3, 1, 2)) * 2 - 1
    model.head(list(model.backbone(calib).values()))
    model.eval()
    for m in bns:
      m.momentum = 0.03
      m.running_var.mul_(torch.empty_like(m.running_var).uniform_(1.0, 1.5))
      m.num_batches_tracked.fill_(int(torch.randint(0, 10**6, ())))
  return model


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
