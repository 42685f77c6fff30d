"""The SSD family's own parts, as torchvision's SSD class owns them: default boxes (`anchors`), the SSD matcher
(`matcher`), the multibox loss with hard-negative mining (`losses`) and the post-processing (`postprocess`).
They build on the shared box maths below them (`ssdlite_jax.boxes`, `ssdlite_jax.box_coder`) and import nothing
above."""
