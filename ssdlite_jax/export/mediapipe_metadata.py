"""MediaPipe Tasks metadata for the .tflite formats, so that `mediapipe.tasks.python.vision.ObjectDetector` (and
the same Tasks API on Android, iOS and the web) runs the file as it is, through its "in-model NMS" path:

  input    `image`: RGB; float32 with NormalizationOptions mean 0 / std 255 (MediaPipe feeds pixels / 255), or
           uint8 pixels without normalisation (tflite-int8)
  outputs  `location` (ymin, xmin, ymax, xmax as fractions: BoundingBoxProperties BOUNDARIES, RATIO, index
           1, 0, 3, 2), `category` (labels.txt, the class names without background, TENSOR_VALUE_LABELS),
           `score`, `number of detections`, named in the file's output order (boxes, classes, scores, num)

MediaPipe finds the four outputs by these names. Its own writer (`object_detector.MetadataWriter`) pairs them
with the outputs by ascending tensor index instead, which TFLite_Detection_PostProcess's outputs have and ours
(the TF converter numbers them the other way round) do not, so the metadata is assembled here from mediapipe's
metadata classes and packed into the file with its MetadataPopulator.
"""

import sys
import types
from typing import Sequence

_DESCRIPTION = "SSD detector exported by ssdlite-jax: network, box decoding, per-class top-k and NMS in the graph."
_OUTPUTS = ("location", "category", "score", "number of detections")   # in the file's output order


def populate(flatbuffer: bytes, class_names: Sequence[str], float_input: bool) -> bytes:
  """The .tflite `flatbuffer` (exported by tflite.py) with MediaPipe metadata and labels.txt (`class_names`
  without the background at 0) packed in; the graph itself is unchanged."""
  try:
    import flatbuffers
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb
    from mediapipe.tasks.metadata import schema_py_generated as schema_fb
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"the tflite formats write MediaPipe metadata, which needs {e.name}: "
                              "pip install '.[export]' (or mediapipe==1.2.3)", name=e.name) from e
  _provide_parser_version()
  from mediapipe.tasks.python.metadata import metadata

  image = metadata_info.InputImageTensorMd(
      name="image", description="RGB image resized to the model size",
      norm_mean=[0.0] if float_input else None, norm_std=[255.0] if float_input else None,
      color_space_type=fb.ColorSpaceType.RGB,
      tensor_type=schema_fb.TensorType.FLOAT32 if float_input else schema_fb.TensorType.UINT8)
  per_detection = metadata_info.ValueRangeMd(min_value=2, max_value=2)   # the detection axis of [1, D, ...]
  labels = metadata_info.LabelFileMd(file_path="labels.txt")
  outputs = [
      metadata_info.LocationTensorMd(name=_OUTPUTS[0], content_range_md=per_detection),
      metadata_info.CategoryTensorMd(name=_OUTPUTS[1], label_files=[labels], content_range_md=per_detection),
      metadata_info.ClassificationTensorMd(name=_OUTPUTS[2], content_range_md=per_detection),
      metadata_info.TensorMd(name=_OUTPUTS[3]),
  ]
  subgraph = fb.SubGraphMetadataT()
  subgraph.inputTensorMetadata = [image.create_metadata()]
  subgraph.outputTensorMetadata = [md.create_metadata() for md in outputs]
  subgraph.outputTensorGroups = [metadata_info.TensorGroupMd("detection_result", list(_OUTPUTS[:3])).create_metadata()]
  model = metadata_info.GeneralMd(name="ssdlite_jax detector", description=_DESCRIPTION).create_metadata()
  model.subgraphMetadata = [subgraph]
  builder = flatbuffers.Builder(0)
  builder.Finish(model.Pack(builder), metadata.MetadataPopulator.METADATA_FILE_IDENTIFIER)

  populator = metadata.MetadataPopulator.with_model_buffer(bytearray(flatbuffer))
  populator.load_metadata_buffer(builder.Output())
  populator.load_associated_file_buffers({"labels.txt": "\n".join(class_names[1:]).encode()})
  populator.populate()
  flatbuffer = bytes(populator.get_model_buffer())
  del populator   # its __del__ removes a temporary file: now, not at interpreter exit (where that fails)
  return flatbuffer


def min_parser_version(metadata_buffer: bytes) -> str:
  """The oldest metadata parser that reads `metadata_buffer` (a ModelMetadata flatbuffer): the newest schema
  member it uses, by the table of mediapipe/tasks/cc/metadata/metadata_version.cc (members added after 1.0.0)."""
  from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

  model = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAsModelMetadata(metadata_buffer, 0))
  options = fb.ProcessUnitOptions
  unit_versions = {options.BertTokenizerOptions: (1, 1, 0), options.SentencePieceTokenizerOptions: (1, 1, 0),
                   options.RegexTokenizerOptions: (1, 2, 1)}
  needed = [(1, 0, 0)]
  files = lambda fs: needed.extend(
      v for f in fs or [] for v, used in (((1, 0, 1), f.type == fb.AssociatedFileType.VOCABULARY),
                                          ((1, 4, 0), f.type == fb.AssociatedFileType.SCANN_INDEX_FILE),
                                          ((1, 4, 1), f.version is not None)) if used)
  units = lambda us: needed.extend(unit_versions.get(u.optionsType, (1, 0, 0)) for u in us or [])
  files(model.associatedFiles)
  for subgraph in model.subgraphMetadata or []:
    for tensor in (subgraph.inputTensorMetadata or []) + (subgraph.outputTensorMetadata or []):
      files(tensor.associatedFiles)
      units(tensor.processUnits)
      if tensor.content is not None and tensor.content.contentPropertiesType == fb.ContentProperties.AudioProperties:
        needed.append((1, 3, 0))
    files(subgraph.associatedFiles)
    for member, version in ((subgraph.inputProcessUnits, (1, 1, 0)), (subgraph.outputProcessUnits, (1, 1, 0)),
                            (subgraph.inputTensorGroups, (1, 2, 0)), (subgraph.outputTensorGroups, (1, 2, 0)),
                            (subgraph.customMetadata, (1, 5, 0))):
      if member is not None:
        needed.append(version)
    units(subgraph.inputProcessUnits)
    units(subgraph.outputProcessUnits)
  return ".".join(map(str, max(needed)))


def _provide_parser_version() -> None:
  """mediapipe's metadata.py imports its C++ helper `_pywrap_metadata_version`, which the mediapipe >= 1.0 wheels
  no longer ship (No module named 'mediapipe.tasks.cc'); where it is missing, min_parser_version stands in."""
  name = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"
  try:
    __import__(name)
    return
  except ImportError:
    pass
  parent = None
  for part in ("mediapipe.tasks.cc", "mediapipe.tasks.cc.metadata", "mediapipe.tasks.cc.metadata.python", name):
    module = sys.modules.setdefault(part, types.ModuleType(part))
    if parent is not None:
      setattr(parent, part.rsplit(".", 1)[1], module)
    parent = module
  parent.GetMinimumMetadataParserVersion = min_parser_version
