"""Move weights between torchvision and ssdlite-jax: `python port_weights.py to-flax --torch IN.pth --out DIR`.

The same program as `ssdlite-port` (installed with the package); its code and options: ssdlite_jax/cli/port_weights.py.
"""

from ssdlite_jax.cli.port_weights import main

if __name__ == "__main__":
  main()
