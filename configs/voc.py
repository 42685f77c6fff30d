"""Train on a Pascal VOC tree (Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt).

  python train.py --config configs/voc.py --workdir runs/voc --config.data.root=/data/VOCdevkit/VOC2012

VOC's 20 classes (+ background) are the default; for your own tree in VOC layout set
--config.model.num_classes=N+1. `difficult` objects are left out of training and ignored by the evaluation
(as COCO crowd objects). See ssdlite_jax/data/voc.py.
"""

from configs import custom_coco


def get_config():
  config = custom_coco.get_config()
  config.data.name = "voc"
  config.model.num_classes = 21
  return config
