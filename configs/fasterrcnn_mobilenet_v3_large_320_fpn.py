"""torchvision's fasterrcnn_mobilenet_v3_large_320_fpn (low-res: 320 / 640, 150 RPN proposals) and its COCO
recipe (references/detection: 8 GPUs x 2 images, 26 epochs).

  python eval.py --config configs/fasterrcnn_mobilenet_v3_large_320_fpn.py \
      --torch-weights fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth --config.data.manual_dir=/data/coco_zips

  python train.py --config configs/fasterrcnn_mobilenet_v3_large_320_fpn.py --workdir runs/frcnn320 \
      --config.init_backbone_from=mobilenet_v3_large

Batches group images by aspect ratio (data.aspect_ratio_group_factor 3, torchvision's): one canvas and one compiled
step per group. With init_backbone_from, features 0-6 stay frozen (model.trainable_backbone_layers None -> 3, as
torchvision); from scratch everything trains. The recipe below is torchvision's: SGD lr 0.02 at global batch 16,
momentum 0.9, weight decay 1e-4, a 1000-iteration linear warmup from 0.001, MultiStepLR x0.1 at epochs 16 and 22;
horizontal flip only. Each image is evaluated alone, at
its own size, as torchvision's references do (batch 1).
"""

from configs import ssdlite320
from ssdlite_jax.rcnn.configs import fasterrcnn_mobilenet_v3_large_320_fpn_config


def get_config():
  config = ssdlite320.get_config()
  config.model = fasterrcnn_mobilenet_v3_large_320_fpn_config()
  config.batch_size = 16             # global; 2 per device on 8 devices as in torchvision's recipe
  config.num_epochs = 26
  config.data.augmentation = "hflip"
  config.optim.learning_rate = 0.02
  config.optim.base_batch_size = 16
  config.optim.weight_decay = 1e-4
  config.optim.schedule = "multistep"
  config.optim.milestones = (16, 22)
  config.optim.gamma = 0.1
  return config
