"""SSD512-ResNet50 (torchvision's unmerged PR #3760: 30.2 COCO AP at epoch 118): configs/ssd300_vgg16.py's
recipe, as the PR trained it, on the reconstructed network of models/resnet.py. The PR started from torchvision's
ImageNet ResNet50: --config.init_backbone_from=resnet50 (torchvision's file, downloaded) loads its trunk, BN
statistics included. Which trunk layers the PR froze is not known; nothing is frozen here."""

from configs import ssd300_vgg16
from ssdlite_jax.ssd.configs import ssd512_resnet50_config


def get_config():
  config = ssd300_vgg16.get_config()
  config.model = ssd512_resnet50_config()
  return config
