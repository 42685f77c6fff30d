"""SSD512-VGG16: configs/ssd300_vgg16.py's recipe (as torchvision's unmerged SSD512 work trained it) on the
512 px model (models.ssd512_vgg16_config: 7 feature maps, 24,660 anchors, 37,075,166 parameters)."""

from configs import ssd300_vgg16
from ssdlite_jax.ssd.configs import ssd512_vgg16_config


def get_config():
  config = ssd300_vgg16.get_config()
  config.model = ssd512_vgg16_config()
  return config
