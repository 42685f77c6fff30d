"""Fine-tune on an Ultralytics YOLO dataset (a data.yaml with train/val image folders or lists and `names`).

  python train.py --config configs/yolo.py --workdir runs/mine \
      --config.data.yaml=/data/mine/data.yaml --config.model.num_classes=N+1 \
      --config.init_from=ssdlite320_mobilenet_v3_large

The dataset is converted to COCO jsons under data_dir/converted (re-done when the YAML or labels change) and
prepared as a COCO folder; num_classes is len(names) + 1 (background). See ssdlite_jax/data/yolo.py.
"""

from configs import custom_coco


def get_config():
  config = custom_coco.get_config()
  config.data.name = "yolo"
  return config
