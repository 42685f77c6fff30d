"""Train an SSD detector: `python train.py --config configs/synthetic.py --workdir runs/synthetic`.

The same program as `ssdlite-train` (installed with the package); its code and options: ssdlite_jax/cli/train.py.
"""

from ssdlite_jax.cli.train import cli

if __name__ == "__main__":
  cli()
