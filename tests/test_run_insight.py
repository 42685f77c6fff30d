"""The numbers behind a run's pictures: the confusion matrix of a hand-built case, PR curves against a
hand-computed precision envelope, results.csv from metrics.jsonl, and each picture's size; drawn labels that
grow with the image."""

import json

import numpy as np
import PIL.Image
import pytest

from ssdlite_jax import confusion, evaluation, plots, results, visualize

CATEGORIES = [{"id": 4, "name": "a"}, {"id": 9, "name": "b"}]


def _ann(ann_id, image_id, cat, bbox, crowd=0):
  return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3],
          "iscrowd": crowd}


def _det(image_id, cat, bbox, score):
  return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


GT = {
  "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2, 3)],
  "categories": CATEGORIES,
  "annotations": [
    _ann(1, 1, 4, [0, 0, 20, 20]),          # a, found as a
    _ann(2, 1, 9, [50, 50, 20, 20]),        # b, found as a (IoU 1)
    _ann(3, 1, 4, [0, 60, 30, 30], crowd=1),
    _ann(4, 2, 9, [10, 10, 30, 30]),        # b, missed: its only detection has IoU 0.36
    _ann(5, 3, 4, [0, 0, 40, 40]),          # two a's and one a detection between them: the higher IoU wins
    _ann(6, 3, 4, [10, 0, 40, 40]),
  ],
}
RESULTS = [
  _det(1, 4, [0, 0, 20, 20], 0.9),
  _det(1, 4, [50, 50, 20, 20], 0.8),
  _det(1, 9, [80, 0, 10, 10], 0.7),        # nothing there: a false b
  _det(1, 4, [5, 65, 10, 10], 0.6),        # inside the crowd a: not counted
  _det(1, 9, [10, 70, 10, 10], 0.55),      # a b inside the crowd a: a false b (COCOeval ignores same-class only)
  _det(1, 4, [80, 80, 10, 10], 0.1),       # below the score threshold: not counted
  _det(2, 9, [10, 10, 18, 18], 0.95),      # IoU 324/900 = 0.36 < 0.5: a false b, and the b is missed
  _det(3, 4, [8, 0, 40, 40], 0.5),         # IoU 32/48 = 0.667 with the first a, 38/42 = 0.905 with the second
]


def test_confusion_matrix_of_a_hand_built_case():
  matrix = confusion.confusion_matrix(RESULTS, GT, iou_threshold=0.5, score_threshold=0.25)
  #                    true a  true b  background (false detections)
  expected = np.array([[2, 1, 0],    # predicted a
                       [0, 0, 3],    # predicted b
                       [1, 1, 0]])   # background: missed objects
  np.testing.assert_array_equal(matrix, expected)
  only_3 = confusion.confusion_matrix(RESULTS, GT, image_ids={3})
  np.testing.assert_array_equal(only_3, [[1, 0, 0], [0, 0, 0], [1, 0, 0]])
  everything = confusion.confusion_matrix(RESULTS, GT, score_threshold=0.0)
  assert everything[0, 2] == 1        # the 0.1 detection is now a false a


def test_pr_curve_is_cocoeval_precision_envelope(tmp_path):
  """One class, two objects, detections TP 0.9, FP 0.8, TP 0.7: precision 1 up to recall 0.5, then the
  envelope of (1/2, 2/3) = 2/3 up to recall 1, at COCOeval's 101 recall points."""
  gt = {"images": [{"id": 1, "file_name": "1.jpg", "width": 100, "height": 100}], "categories": CATEGORIES[:1],
        "annotations": [_ann(1, 1, 4, [0, 0, 20, 20]), _ann(2, 1, 4, [50, 50, 20, 20])]}
  path = tmp_path / "gt.json"
  path.write_text(json.dumps(gt))
  results = [_det(1, 4, [0, 0, 20, 20], 0.9), _det(1, 4, [30, 0, 10, 10], 0.8), _det(1, 4, [50, 50, 20, 20], 0.7)]
  result = evaluation.coco_evaluation(results, str(path))
  np.testing.assert_allclose(result.recall, np.linspace(0, 1, 101))
  expected = np.where(np.linspace(0, 1, 101) <= 0.5 + 1e-9, 1.0, 2 / 3)
  np.testing.assert_allclose(result.precision50[:, 0], expected)
  assert result.per_class[0]["AP50"] == pytest.approx(expected.mean())
  out = plots.plot_pr_curves(result.recall, result.precision50, ["a"], [result.per_class[0]["AP50"]],
                             str(tmp_path / "pr.png"))
  with PIL.Image.open(out) as im:
    assert im.size == (900, 700)


def test_pictures_open_at_their_size(tmp_path):
  matrix = confusion.confusion_matrix(RESULTS, GT)
  with PIL.Image.open(plots.plot_confusion_matrix(matrix, ["a", "b"], str(tmp_path / "cm.png"))) as im:
    assert im.size == (735, 535)    # (side + 2) x side inches at 100 dpi, side = 4 + 0.45 x 3 classes
  with PIL.Image.open(plots.plot_labels(GT, str(tmp_path / "labels.png"))) as im:
    assert im.size == (1800, 550)
  assert not list(tmp_path.glob("*.tmp*"))


def test_results_csv_merges_train_and_eval_rows(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  records = [{"step": 2, "train/loss": 3.0, "train/lr": 0.1}, {"step": 4, "train/loss": 2.0, "train/lr": 0.2},
             {"step": 4, "eval/AP": 0.25}, {"step": 4, "train/loss": 1.5, "train/lr": 0.2}]   # resumed: step 4 again
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
  columns, rows = results.read_metrics_jsonl(str(jsonl))
  assert columns == ["step", "train/loss", "train/lr", "eval/AP"]
  assert rows == [{"step": 2, "train/loss": 3.0, "train/lr": 0.1, "eval/AP": None},
                  {"step": 4, "train/loss": 1.5, "train/lr": 0.2, "eval/AP": 0.25}]
  with open(results.write_csv(columns, rows, str(tmp_path / "results.csv"))) as f:
    assert f.read().splitlines() == ["step,train/loss,train/lr,eval/AP", "2,3.0,0.1,", "4,1.5,0.2,0.25"]
  with PIL.Image.open(plots.plot_results(rows, str(tmp_path / "results.png"))) as im:
    assert im.size == (1600, 320)


@pytest.mark.parametrize("side", [120, 1200])
def test_drawn_labels_scale_with_the_image(side):
  """The label's filled box (class colour) is at least 90 % of the font size high, the font 3.5 % of the image
  side (12 px minimum): a label stays readable on a large image."""
  image = np.zeros((side, side, 3), np.uint8)
  box = [side * 0.3, side * 0.5, side * 0.7, side * 0.9]
  out = np.asarray(visualize.draw_boxes(image, [box], [1], ["__background__", "cat"], [0.87]))
  color = np.asarray(visualize.class_color(1))
  filled = np.all(out == color, axis=-1)
  rows = np.flatnonzero(filled[: int(box[1]), int(box[0]) + 1])     # a column through the label, above the box
  assert rows.size >= 0.9 * max(round(0.035 * side), 12), rows.size
  assert rows.max() == int(box[1]) - 1                               # the label sits on the box's top edge
  line = max(round(side * 0.003), 2)
  assert filled[int(side * 0.7), int(box[0]):int(box[0]) + line].all()   # the left edge, `line` px wide


def test_mosaic_tiles_keep_aspect():
  images = [PIL.Image.new("RGB", (200, 100), (255, 0, 0)), PIL.Image.new("RGB", (50, 100), (0, 255, 0))]
  out = np.asarray(visualize.mosaic(images, columns=2, cell=100))
  assert out.shape == (100, 200, 3)
  red = np.all(out == (255, 0, 0), axis=-1)
  assert red[25:75, :100].all() and not red[:24].any()       # 200x100 -> 100x50, centred vertically
  green = np.all(out == (0, 255, 0), axis=-1)
  assert green[:, 125:175].all() and not green[:, 100:124].any()
