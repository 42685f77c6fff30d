"""Run a detector on image files: `python predict.py --checkpoint DIR --output dets.json a.jpg`.

The same program as `ssdlite-predict` (installed with the package); its code and options: ssdlite_jax/cli/predict.py.
"""

from ssdlite_jax.cli.predict import main

if __name__ == "__main__":
  main()
