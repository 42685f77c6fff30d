"""Weight porting both ways through files and the CLIs, error reporting, init, predict.py."""

import json
import os
import pickle
import re
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ssdlite_jax.cli import port_weights, predict
from ssdlite_jax import checkpoint, media, porting
from ssdlite_jax.inference import Predictor, to_rgb_uint8
from ssdlite_jax.loading import load_detector
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssdlite320_config
from tests.helpers import Server, import_or_skip
from tests.torch_reference import random_torchvision_ssdlite, smooth_images, state_dict_numpy


@pytest.fixture(scope="module")
def torch_model():
  return random_torchvision_ssdlite(seed=5)


@pytest.fixture(scope="module")
def ckpt_dir(torch_model, tmp_path_factory):
  torch = import_or_skip("torch")
  tmp = tmp_path_factory.mktemp("port")
  torch.save(torch_model.state_dict(), tmp / "in.pth")
  port_weights.main(["to-flax", "--torch", str(tmp / "in.pth"), "--out", str(tmp / "ckpt")])
  return tmp / "ckpt"


@pytest.mark.torch
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_round_trip_through_files_is_exact(torch_model, ckpt_dir, tmp_path, fmt):
  torch = import_or_skip("torch")
  torchvision = import_or_skip("torchvision")
  out = tmp_path / f"out.{fmt}"
  port_weights.main(["to-torch", "--checkpoint", str(ckpt_dir), "--out", str(out)])
  fresh = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
  ref = torch_model.state_dict()
  written = porting.load_state_dict(str(out))   # the file itself: load_state_dict would mend a 1-d counter
  # .pth keeps torchvision's state_dict order; safetensors stores its keys sorted.
  assert (list(written) if fmt == "pth" else sorted(written)) == (list(ref) if fmt == "pth" else sorted(ref))
  assert len(ref) == 476
  for k in ref:
    assert written[k].shape == tuple(ref[k].shape) and written[k].dtype == ref[k].numpy().dtype, k
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True)
  got = fresh.state_dict()
  counts = {int(v) for k, v in ref.items() if k.endswith("num_batches_tracked")}
  assert len(counts) > 10 and min(counts) > 0   # torch_reference draws a non-zero count per layer
  for k in ref:
    assert got[k].dtype == ref[k].dtype, k
    assert torch.equal(got[k], ref[k]), k


@pytest.mark.torch
def test_checkpoint_holds_model_config(ckpt_dir):
  variables, cfg, step = checkpoint.load_variables(str(ckpt_dir))
  assert step == 0 and cfg.num_classes == 91
  assert variables["batch_stats"]["backbone"]["stem"]["bn"]["num_batches_tracked"].dtype == np.int32


@pytest.mark.torch
def test_mismatched_keys_are_all_named(torch_model):
  det = build_model(ssdlite320_config())
  sd = state_dict_numpy(torch_model)
  sd.pop("backbone.extra.0.1.1.running_var")
  sd["head.regression_head.module_list.0.1.weight"] = np.zeros((24, 671, 1, 1), np.float32)
  sd["backbone.features.99.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    porting.torch_to_flax(sd, det)
  msg = str(e.value)
  assert "missing key backbone.extra.0.1.1.running_var (expected shape (256,))" in msg
  assert ("shape mismatch for head.regression_head.module_list.0.1.weight: checkpoint (24, 671, 1, 1), "
          "model (24, 672, 1, 1)") in msg
  assert "unexpected key backbone.features.99.weight (3,)" in msg


@pytest.mark.torch
def test_class_count_and_variant_come_from_the_weights(tmp_path):
  torch = import_or_skip("torch")
  model13 = random_torchvision_ssdlite(num_classes=13, seed=2)
  torch.save(model13.state_dict(), tmp_path / "finetuned_13class.pth")
  port_weights.main(["to-flax", "--torch", str(tmp_path / "finetuned_13class.pth"), "--out", str(tmp_path / "c")])
  detector, variables, step = load_detector(str(tmp_path / "c"))
  assert step == 0 and detector.config.num_classes == 13
  back = porting.flax_to_torch(variables, detector)
  for k, v in model13.state_dict().items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  assert Predictor.from_torch(str(tmp_path / "finetuned_13class.pth")).detector.config.num_classes == 13
  with pytest.raises(SystemExit, match="has 13 classes, not --num-classes 4; add --skip-mismatched"):
    port_weights.main(["to-flax", "--torch", str(tmp_path / "finetuned_13class.pth"), "--out", str(tmp_path / "d"),
                       "--num-classes", "4"])
  # A state_dict of another architecture: the error names the keys that decided it.
  other = {"backbone.features.0.weight": np.zeros((64, 3, 3, 3), np.float32), **state_dict_numpy(model13)}
  del other["backbone.features.0.0.0.weight"]
  porting.save_state_dict(other, str(tmp_path / "vgg.safetensors"))
  with pytest.raises(ValueError) as e:
    load_detector(str(tmp_path / "vgg.safetensors"))
  msg = str(e.value)
  assert "vgg.safetensors: the state_dict fits no known model variant" in msg
  assert "ssdlite320_mobilenet_v3_large: 1 keys missing (e.g. ['backbone.features.0.0.0.weight'])" in msg
  assert "1 unexpected (e.g. ['backbone.features.0.weight'])" in msg


@pytest.mark.torch
def test_fine_tune_to_other_num_classes(torch_model):
  cfg = ssdlite320_config()
  cfg.num_classes = 4
  det = build_model(cfg)
  sd = state_dict_numpy(torch_model)
  variables, problems = porting.torch_to_flax(sd, det, skip_mismatched=True, rng=jax.random.key(1))
  head_proj = re.compile(r"head\.classification_head\.module_list\.\d\.1\.(weight|bias)")
  assert len(problems) == 12 and all(head_proj.search(p) for p in problems)
  back = porting.flax_to_torch(variables, det)
  for k, v in sd.items():
    if head_proj.fullmatch(k):
      assert back[k].shape[0] == 6 * 4
    else:
      np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.torch
def test_code_carrying_pickle_is_refused(tmp_path):
  import_or_skip("torch")
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    pickle.dump({"backbone.x": Evil()}, f)
  with pytest.raises(ValueError, match="evil.pth: refused"):
    porting.load_state_dict(str(path))
  assert not marker.exists()


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  # the ONNX venv has no torch: exporting from a .pth there names the file and the ways round it
  from ssdlite_jax.cli import export as export_cli
  path = tmp_path / "coco.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` raises ModuleNotFoundError
  out = tmp_path / "coco.onnx"
  with pytest.raises(SystemExit, match=r"coco\.pth: reading a \.pth needs torch .*port_weights\.py to-flax"):
    export_cli.main(["--torch-weights", str(path), "--format", "onnx", "--out", str(out)])
  assert not out.exists()


def test_from_scratch_init_matches_torchvision_recipe():
  det = build_model(ssdlite320_config())
  flat = porting.flax_to_torch(det.init(jax.random.key(0)), det)
  kernels = [v for k, v in flat.items() if v.ndim == 4]
  assert len(kernels) == 98
  allw = np.concatenate([k.ravel() for k in kernels])
  assert abs(allw.mean()) < 1e-3 and abs(allw.std() - 0.03) < 3e-4
  for k, v in flat.items():
    if k.endswith("running_var") or (k.endswith(".1.weight") and v.ndim == 1):
      assert np.all(v == 1), k
    elif v.ndim == 1:  # BN bias, running_mean, conv biases
      assert np.all(v == 0), k


def test_image_conversion():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(to_rgb_uint8(gray), np.repeat(gray[:, :, None], 3, 2))
  rgba = np.random.RandomState(0).randint(0, 256, (3, 4, 4)).astype(np.uint8)
  np.testing.assert_array_equal(to_rgb_uint8(rgba), rgba[:, :, :3])
  with pytest.raises(ValueError, match="img: expected a uint8"):
    to_rgb_uint8(np.zeros((3, 4, 3), np.float32), "img")
  with pytest.raises(ValueError, match="got shape"):
    to_rgb_uint8(np.zeros((3, 4, 2), np.uint8))


@pytest.mark.torch
def test_predict_cli(ckpt_dir, torch_model, tmp_path, capsys):
  """The deprecated flags (--checkpoint, --output, --min-score) still work, each with a deprecation line."""
  torch = import_or_skip("torch")
  img = (smooth_images(1, 240, 300, seed=3)[0] * 255).round().astype(np.uint8)
  Image.fromarray(img).save(tmp_path / "a.png")
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  with pytest.raises(SystemExit, match="bad.jpg: cannot read image"):
    predict.main(["--checkpoint", str(ckpt_dir), "--output", str(tmp_path / "d.json"),
                  str(tmp_path / "a.png"), str(tmp_path / "bad.jpg")])
  predict.main(["--checkpoint", str(ckpt_dir), "--output", str(tmp_path / "d.json"), "--skip-unreadable",
                "--draw", str(tmp_path / "drawn"), "--min-score", "0.0",
                str(tmp_path / "a.png"), str(tmp_path / "bad.jpg")])
  records = json.loads((tmp_path / "d.json").read_text())
  assert [r["image"] for r in records] == [str(tmp_path / "a.png")]
  warnings = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
  old = ["warning: --checkpoint is deprecated and will be removed: use --weights",
         "warning: --output is deprecated and will be removed: use --out"]
  assert warnings == old + old + [
      "warning: --min-score is deprecated and will be removed: use --conf (it filters the JSON too)"]
  with torch.no_grad():
    ref = torch_model([torch.from_numpy(img).permute(2, 0, 1).float() / 255])[0]
  np.testing.assert_allclose(records[0]["scores"][:50], ref["scores"][:50].numpy(), atol=1e-5)
  assert Image.open(tmp_path / "drawn" / "a.jpg").size == (300, 240)


@pytest.mark.torch
def test_predict_cli_on_a_folder_tree_a_pattern_and_a_url(ckpt_dir, tmp_path):
  """Folders are searched at any depth for image files (other files left out), patterns expanded, URLs fetched
  (from a local HTTP server); the JSON keeps the Predictor's detections scoring >= --conf, with class names; drawn
  copies keep their paths relative to the folder, so two img.png in different folders are both drawn; a folder
  without images, a pattern that matches nothing or a URL that answers 404 is a one-line error."""
  tree = tmp_path / "tree"
  for i, rel in enumerate(["a/img.png", "b/img.png", "b/c/deep.jpg"]):
    (tree / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((smooth_images(1, 100 + 30 * i, 160, seed=10 + i)[0] * 255).round().astype(np.uint8)).save(
        tree / rel, quality=95)
  (tree / "b" / "notes.txt").write_text("not an image")
  server = Server(str(tree))
  url = f"{server.url}/b/c/deep.jpg"
  found = [str(tree / r) for r in ("a/img.png", "b/c/deep.jpg", "b/img.png")] + [str(tree / "b" / "img.png"), url]
  predictor = Predictor.from_checkpoint(str(ckpt_dir))
  full = predictor([media.read_image(p) for p in found[:-1]] + [media.read_image(str(tree / "b/c/deep.jpg"))])
  scores = np.sort(np.concatenate([d["scores"] for d in full]))
  conf = float(scores[len(scores) // 2 - 1: len(scores) // 2 + 1].mean())   # between two scores: half kept
  out = tmp_path / "d.json"
  predict.main(["--weights", str(ckpt_dir), "--out", str(out), "--draw", str(tmp_path / "drawn"),
                "--conf", str(conf), str(tree), str(tree / "b" / "*.png"), url])
  records = json.loads(out.read_text())
  assert [r["image"] for r in records] == found
  for r, want in zip(records, full):
    keep = want["scores"] >= conf
    np.testing.assert_allclose(r["scores"], want["scores"][keep], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.reshape(r["boxes"], (-1, 4)), want["boxes"][keep], rtol=0, atol=1e-3)
    assert r["labels"] == want["labels"][keep].tolist()
    assert r["names"] == [predictor.class_names[i] for i in r["labels"]]
  assert 0 < sum(len(r["scores"]) for r in records) == (scores >= conf).sum() < len(scores)
  for rel, size in (("a/img.jpg", (160, 100)), ("b/img.jpg", (160, 130)), ("b/c/deep.jpg", (160, 160)),
                    ("img.jpg", (160, 130)), ("deep.jpg", (160, 160))):
    assert Image.open(tmp_path / "drawn" / rel).size == size, rel
  (tree / "b" / "c" / "deep.jpg").unlink()
  with pytest.raises(SystemExit, match="tree/b/c: a folder without image or video files"):
    predict.main(["--weights", str(ckpt_dir), "--out", str(out), str(tree / "b" / "c")])
  with pytest.raises(SystemExit, match=r"\*\.gif: no file matches this pattern"):
    predict.main(["--weights", str(ckpt_dir), "--out", str(out), str(tree / "*.gif")])
  with pytest.raises(SystemExit, match=r"b/c/deep\.jpg: cannot read image \(Not Found\)"):
    predict.main(["--weights", str(ckpt_dir), "--out", str(out), url])
  server.shutdown()


def _write_video(path, frames, codec, pix_fmt, fps=5, rotation=0):
  """frames (H x W x 3 uint8 RGB) encoded by PyAV into `path`, with a display matrix turning them `rotation`
  degrees counterclockwise (a phone's portrait video: -90)."""
  import fractions
  av = import_or_skip("av")
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=fractions.Fraction(fps))
    stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
    if rotation:
      stream.set_display_rotation(rotation)
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


def _read_video_cv2(path):
  """(frames as OpenCV decodes them, turned upright by their display matrix (its default), RGB; frames per
  second): an independent reader of what predict.py reads and writes."""
  cv2 = import_or_skip("cv2")
  capture, frames = cv2.VideoCapture(str(path)), []
  while (frame := capture.read())[0]:
    frames.append(np.ascontiguousarray(frame[1][:, :, ::-1]))
  fps = capture.get(cv2.CAP_PROP_FPS)
  capture.release()
  return frames, fps


@pytest.mark.torch
def test_predict_cli_on_videos(ckpt_dir, tmp_path, capsys):
  """An image, a phone-style H.264 .mp4 (stored 96 x 160, its display matrix turning it upright to 160 x 96), a
  junk .mp4 and a lossless .mov with odd sides, run in batches of 4 that mix them: one record per frame ("frame":
  its index) equal to the Predictor's detections on the frames as OpenCV decodes them and turns them upright;
  --draw writes each video as an .mp4 at its frame rate (an odd side padded by one) whose frames are the drawn
  frames, to H.264's loss; the junk video is skipped with a warning naming it, or without --skip-unreadable
  stops the program with one line and leaves no JSON."""
  from ssdlite_jax.visualize import draw_detections
  image = (smooth_images(1, 100, 90, seed=30)[0] * 255).round().astype(np.uint8)
  Image.fromarray(image).save(tmp_path / "a.png")
  phone = [(smooth_images(1, 96, 160, seed=31 + k)[0] * 255).round().astype(np.uint8) for k in range(7)]
  _write_video(tmp_path / "phone.mp4", phone, "libx264", "yuv420p", fps=5, rotation=-90)
  odd = [(smooth_images(1, 75, 101, seed=40 + k)[0] * 255).round().astype(np.uint8) for k in range(3)]
  _write_video(tmp_path / "odd.mov", odd, "png", "rgb24", fps=12)
  (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 cut short")
  phone_frames, phone_fps = _read_video_cv2(tmp_path / "phone.mp4")
  odd_frames, _ = _read_video_cv2(tmp_path / "odd.mov")
  assert len(phone_frames) == 7 and phone_frames[0].shape == (160, 96, 3) and phone_fps == 5
  assert np.array_equal(odd_frames, odd)   # lossless: OpenCV reads back what was written
  pictures = [image] + phone_frames + odd_frames
  predictor = Predictor.from_checkpoint(str(ckpt_dir), batch_size=4)   # the batches predict.py runs
  full = predictor(pictures)
  scores = np.sort(np.concatenate([d["scores"] for d in full]))
  conf = float(scores[-40:-38].mean())   # the top 39 detections drawn: boxes on most pictures
  sources = ["a.png", "phone.mp4", "junk.mp4", "odd.mov"]
  out = tmp_path / "d.json"
  predict.main(["--weights", str(ckpt_dir), "--out", str(out), "--draw", str(tmp_path / "drawn"), "--batch-size", "4",
                "--conf", str(conf), "--skip-unreadable", *(str(tmp_path / s) for s in sources)])
  assert f"warning: skipped {tmp_path / 'junk.mp4'}: cannot read video (" in capsys.readouterr().err
  records = json.loads(out.read_text())
  assert [(os.path.basename(r["image"]), r.get("frame")) for r in records] == (
      [("a.png", None)] + [("phone.mp4", k) for k in range(7)] + [("odd.mov", k) for k in range(3)])
  for r, want in zip(records, full, strict=True):
    keep = want["scores"] >= conf
    assert r["scores"] == want["scores"][keep].tolist() and r["labels"] == want["labels"][keep].tolist()
    np.testing.assert_array_equal(np.reshape(r["boxes"], (-1, 4)), want["boxes"][keep])
  assert 0 < sum(len(r["scores"]) for r in records[1:8]) and 0 < sum(len(r["scores"]) for r in records[8:])
  assert sorted(os.listdir(tmp_path / "drawn")) == ["a.jpg", "odd.mp4", "phone.mp4"]
  for name, first, frames, fps in (("phone", 1, phone_frames, 5), ("odd", 8, odd_frames, 12)):
    drawn, drawn_fps = _read_video_cv2(tmp_path / "drawn" / f"{name}.mp4")
    assert len(drawn) == len(frames) and drawn_fps == fps, name
    h, w = frames[0].shape[:2]
    assert drawn[0].shape == (h + h % 2, w + w % 2, 3), name
    for k, (got, frame) in enumerate(zip(drawn, frames)):
      got = got[:h, :w].astype(np.float32)
      want = np.asarray(draw_detections(frame, full[first + k], predictor.class_names, conf), np.float32)
      boxes = np.abs(want - frame).max(axis=2) > 64   # the pixels the drawing changed much
      # measured: mean |video - drawn| 7-16 (H.264 on small frames), 15-18 on the drawn pixels, 69-86 there from
      # the frame undrawn
      assert boxes.any() and np.abs(got - want).mean() < 20, (name, k)
      assert np.abs(got - want)[boxes].mean() < np.abs(got - frame)[boxes].mean() / 3, (name, k)
  out.unlink()
  with pytest.raises(SystemExit, match=r"junk\.mp4: cannot read video \("):
    predict.main(["--weights", str(ckpt_dir), "--out", str(out), str(tmp_path / "a.png"), str(tmp_path / "junk.mp4")])
  assert not out.exists()


@pytest.mark.torch
def test_predict_cli_memory_does_not_grow_with_the_number_of_images(ckpt_dir, tmp_path, monkeypatch):
  """A folder of 304 JPEGs of 480 x 640 (280 MB decoded) through predict.py --conf 0 (every detection in the JSON):
  the Python heap's peak (tracemalloc, which counts numpy's buffers) over the whole run is that over its first 24
  images (loading the weights, 3 batches of 8 run and written), within 4 MB (measured: 40.10 and 40.11 MB;
  decoding them all first, as predict.py did: 39.4 and 311.7 MB); every record is the Predictor's."""
  import shutil
  import tracemalloc
  folder = tmp_path / "images"
  folder.mkdir()
  for k in range(6):
    Image.fromarray((smooth_images(1, 480, 640, seed=50 + k)[0] * 255).round().astype(np.uint8)).save(
        tmp_path / f"{k}.jpg", quality=90)
  for i in range(304):
    shutil.copy(tmp_path / f"{i % 6}.jpg", folder / f"{i:03d}.jpg")
  # images i and i + 24 are one image at one place in a batch of 8: the same detections, bit for bit
  want = Predictor.from_checkpoint(str(ckpt_dir))([media.read_image(str(folder / f"{i:03d}.jpg")) for i in range(24)])
  read, early = media.read, []

  def reading(found, on_error):   # media.read, noting the peak when the 25th image is asked for
    for k, picture in enumerate(read(found, on_error)):
      if k == 24:
        early.append(tracemalloc.get_traced_memory()[1])
      yield picture
  monkeypatch.setattr(media, "read", reading)
  tracemalloc.start()
  try:
    predict.main(["--weights", str(ckpt_dir), "--out", str(tmp_path / "d.json"), "--conf", "0", str(folder)])
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  records = json.loads((tmp_path / "d.json").read_text())
  assert len(records) == 304
  for i, r in enumerate(records):
    assert r["scores"] == want[i % 24]["scores"].tolist(), i
    np.testing.assert_array_equal(np.reshape(r["boxes"], (-1, 4)), want[i % 24]["boxes"])
  assert peak - early[0] < 4e6, (early, peak)


@pytest.mark.torch
def test_truncated_html_and_empty_weight_files_are_one_line_errors(tmp_path):
  """A download cut short (zip archive or legacy pickle), an HTML error page saved as .pth, an empty file and a
  truncated .safetensors: a ValueError naming the file and what it is, never torch's internal error (an HTML page
  used to be reported as a refused code-carrying pickle); the CLIs print it as one line."""
  torch = import_or_skip("torch")
  from ssdlite_jax.cli import port_weights
  state = {"backbone.w": torch.zeros(300, 100)}
  torch.save(state, tmp_path / "ok.pth")
  torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  porting.save_state_dict({"backbone.w": np.zeros((300, 100), np.float32)}, str(tmp_path / "ok.safetensors"))
  for name in ("ok.pth", "legacy.pth", "ok.safetensors"):
    data = (tmp_path / name).read_bytes()
    (tmp_path / f"cut_{name}").write_bytes(data[:len(data) // 2])
  (tmp_path / "page.pth").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
  (tmp_path / "empty.pth").write_bytes(b"")
  expected = {
      "cut_ok.pth": r"cut_ok\.pth: unreadable, truncated or corrupt \(",
      "cut_legacy.pth": r"cut_legacy\.pth: unreadable, truncated or corrupt \(unexpected EOF",
      "cut_ok.safetensors": r"cut_ok\.safetensors: not a readable \.safetensors file",
      "page.pth": r"page\.pth: not a PyTorch checkpoint: it starts with b'<!DOCTYPE html>.*\(an HTML page",
      "empty.pth": r"empty\.pth: empty file",
  }
  for name, pattern in expected.items():
    with pytest.raises(ValueError, match=pattern):
      porting.load_state_dict(str(tmp_path / name))
  assert set(porting.load_state_dict(str(tmp_path / "legacy.pth"))) == {"backbone.w"}
  out = tmp_path / "ckpt"
  with pytest.raises(SystemExit, match=r"page\.pth: not a PyTorch checkpoint") as e:
    port_weights.main(["to-flax", "--torch", str(tmp_path / "page.pth"), "--out", str(out)])
  assert "\n" not in str(e.value.code) and not out.exists()
