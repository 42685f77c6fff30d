"""Move SSDlite weights between torchvision and ssdlite-jax checkpoints.

  python port_weights.py to-flax --torch IN.pth --out CKPT_DIR [--num-classes 91]
  python port_weights.py to-flax --torch IN.pth --out CKPT_DIR --num-classes 3 --skip-mismatched
  python port_weights.py to-torch --checkpoint CKPT_DIR --out OUT.pth   (or OUT.safetensors)

IN/OUT may be .pth (read with torch.load(weights_only=True)) or .safetensors. CKPT_DIR is the orbax
checkpoint directory that train.py writes and eval.py / predict.py read.
"""

import argparse
import sys

import jax

from ssdlite_jax import checkpoint, porting
from ssdlite_jax.models import build_model, default_model_config


def to_flax(args):
  cfg = default_model_config()
  cfg.num_classes = args.num_classes
  detector = build_model(cfg)
  result = porting.load_torchvision_weights(args.torch, detector, skip_mismatched=args.skip_mismatched,
                                            rng=jax.random.key(args.seed))
  if args.skip_mismatched:
    variables, problems = result
    print(f"{len(problems)} keys of {args.torch} not loaded (fresh initialisation kept where missing):")
    for line in problems:
      print(f"  {line}")
  else:
    variables = result
  checkpoint.save_variables(args.out, 0, variables, cfg)
  print(f"wrote {args.out} (step 0, num_classes={cfg.num_classes})")


def to_torch(args):
  variables, cfg, step = checkpoint.load_variables(args.checkpoint, args.step)
  state_dict = porting.flax_to_torch(variables, build_model(cfg))
  porting.save_state_dict(state_dict, args.out)
  print(f"wrote {args.out} ({len(state_dict)} tensors from step {step}); load it with "
        f"torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, "
        f"num_classes={cfg.num_classes}).load_state_dict(...)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("to-flax", help="torchvision state_dict -> orbax checkpoint")
  p.add_argument("--torch", required=True, help=".pth or .safetensors state_dict")
  p.add_argument("--out", required=True, help="checkpoint directory to write")
  p.add_argument("--num-classes", type=int, default=91)
  p.add_argument("--skip-mismatched", action="store_true",
                 help="fine-tuning: keep fresh weights for mis-shaped keys (e.g. another num_classes)")
  p.add_argument("--seed", type=int, default=0, help="seed for re-initialised tensors")
  p.set_defaults(fn=to_flax)
  p = sub.add_parser("to-torch", help="orbax checkpoint -> torchvision state_dict")
  p.add_argument("--checkpoint", required=True, help="checkpoint directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--out", required=True, help="output .pth or .safetensors")
  p.set_defaults(fn=to_torch)
  args = parser.parse_args(argv)
  try:
    args.fn(args)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
