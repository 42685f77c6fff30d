"""The SSD family: the detector (`detector`, the contract of ssdlite_jax.detector) and its variants' configs
(`configs`), and its own parts, as torchvision's SSD class owns them: default boxes (`anchors`), the SSD matcher
(`matcher`), the multibox loss with hard-negative mining (`losses`) and the post-processing (`postprocess`).
They build on the contract, the shared box maths and the networks below them (`ssdlite_jax.detector`,
`ssdlite_jax.boxes`, `ssdlite_jax.box_coder`, `ssdlite_jax.models`) and import nothing above."""
