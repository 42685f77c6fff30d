"""The networks: layers, backbones and heads as Flax modules, with their torchvision porting maps. The families
(ssdlite_jax.ssd, ...) assemble them into detectors; ssdlite_jax.zoo builds those from configs."""
