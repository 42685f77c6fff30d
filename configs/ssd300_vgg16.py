"""torchvision's COCO recipe for SSD300-VGG16 (references/detection: 8 GPUs x 4 images, 120 epochs).

  python train.py --config configs/ssd300_vgg16.py --workdir runs/ssd300 \
      --config.data.manual_dir=/data/coco_zips \
      --config.init_backbone_from=vgg16_features \
      --config.optim.frozen="('backbone/conv1_1', 'backbone/conv1_2')"

The recipe starts from torchvision's ImageNet VGG16 features (the amdegroot port: 0-255 input minus the mean)
and, given those, freezes conv1 (trainable_backbone_layers=4): the two lines above. Without them, training
starts from torchvision's from-scratch init with nothing frozen, as ssd300_vgg16(weights_backbone=None).
SGD lr 0.002 at global batch 32, momentum 0.9, weight decay 5e-4 on every trained parameter, 1000-step
linear warmup from 0.001, MultiStepLR x0.1 at epochs 80 and 110; 'ssd' augmentation.
"""

from configs import ssdlite320
from ssdlite_jax.ssd.configs import ssd300_vgg16_config


def get_config():
  config = ssdlite320.get_config()
  config.model = ssd300_vgg16_config()
  config.batch_size = 32             # global; 4 per device on 8 devices as in torchvision's recipe
  config.eval_batch_size = 32
  config.num_epochs = 120
  config.data.augmentation = "ssd"
  config.optim.learning_rate = 0.002
  config.optim.base_batch_size = 32
  config.optim.weight_decay = 5e-4
  config.optim.schedule = "multistep"
  config.optim.milestones = (80, 110)
  config.optim.gamma = 0.1
  return config
