"""torchvision's COCO recipe for SSDlite320-MobileNetV3-Large (references/detection, 8 GPUs x 24 images).

  python train.py --config configs/ssdlite320.py --workdir runs/coco \
      --config.data.manual_dir=/data/coco_zips --config.batch_size=48
"""

import ml_collections

from ssdlite_jax.data.config import default_data_config
from ssdlite_jax.ssd.configs import ssdlite320_config
from ssdlite_jax.optim import default_optim_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 192           # global; 24 per device on 8 devices as in torchvision's recipe
  config.eval_batch_size = 64       # global
  config.num_epochs = 660
  config.max_steps = 0              # > 0 stops earlier (after this many optimizer steps)
  config.sync_bn = False            # torchvision's recipe: per-device BN statistics
  config.init_from = ""             # "" = from scratch; a torchvision .pth/.safetensors, weights name or checkpoint dir
  config.init_backbone_from = ""    # an ImageNet backbone .pth/.safetensors or name (e.g. mobilenet_v3_large)
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3       # the last K, plus the best by mAP
  config.eval_every_epochs = 10     # 0 = only at the end
  config.plot_score_thresh = 0.25   # detections counted in plots/confusion_matrix and drawn in val_batch_pred
  config.plots = True               # WORKDIR/plots/*; False: the numbers only (results.csv, eval/step_N/*.json)
  config.count_flops = True         # the start-up line's GFLOP per image (XLA's count: one more forward lowering)

  config.model = ssdlite320_config()
  config.data = default_data_config()
  config.data.name = "coco/2017"
  config.data.augmentation = "ssdlite"

  config.optim = default_optim_config()   # sgd, lr 0.15 @ 192 scaled linearly, wd 4e-5, warmup, cosine
  config.optim.batch_size = config.get_ref("batch_size")
  config.optim.num_epochs = config.get_ref("num_epochs")
  return config
