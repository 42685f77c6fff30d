"""Export a detector for deployment: `python export.py --checkpoint DIR --format stablehlo --out model.jaxexport`.

The same program as `ssdlite-export` (installed with the package); its code and options: ssdlite_jax/cli/export.py.
"""

from ssdlite_jax.cli.export import main

if __name__ == "__main__":
  main()
