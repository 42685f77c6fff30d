"""COCO evaluation of a checkpoint or of torchvision weights: `python eval.py --config ... --workdir ...`.

The same program as `ssdlite-eval` (installed with the package); its code and options: ssdlite_jax/cli/eval.py.
"""

from ssdlite_jax.cli.eval import cli

if __name__ == "__main__":
  cli()
