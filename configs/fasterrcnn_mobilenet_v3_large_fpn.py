"""torchvision's fasterrcnn_mobilenet_v3_large_fpn (high-res: 800 / 1333, 1000 RPN proposals), same recipe as
configs/fasterrcnn_mobilenet_v3_large_320_fpn.py (which says what runs today).

  python eval.py --config configs/fasterrcnn_mobilenet_v3_large_fpn.py \
      --torch-weights fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth --config.data.manual_dir=/data/coco_zips
"""

from configs import fasterrcnn_mobilenet_v3_large_320_fpn
from ssdlite_jax.rcnn.configs import fasterrcnn_mobilenet_v3_large_fpn_config


def get_config():
  config = fasterrcnn_mobilenet_v3_large_320_fpn.get_config()
  config.model = fasterrcnn_mobilenet_v3_large_fpn_config()
  return config
