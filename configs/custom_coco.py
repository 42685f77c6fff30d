"""Fine-tune on your own COCO-format dataset (a folder with images and instances_*.json).

  python train.py --config configs/custom_coco.py --workdir runs/mine \
      --config.data.root=/data/mine --config.data.train_ann=annotations/instances_train.json \
      --config.data.val_ann=annotations/instances_val.json --config.model.num_classes=N+1 \
      --config.init_from=ssdlite320_mobilenet_v3_large

num_classes must be the dataset's category count + 1 (train.py checks it); starting from torchvision's COCO
weights re-initialises the classification head when the class count differs.
"""

from configs import ssdlite320


def get_config():
  config = ssdlite320.get_config()
  config.data.name = "coco_folder"
  config.data.label_mode = "contiguous"
  config.batch_size = 32
  config.num_epochs = 50
  config.eval_every_epochs = 5
  config.optim.learning_rate = 0.15 * 32 / 192 / 4   # a gentler start for fine-tuning
  config.optim.base_batch_size = 32
  return config
