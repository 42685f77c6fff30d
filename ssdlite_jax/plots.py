"""The pictures of a run (matplotlib, no display needed): training curves, PR curves, confusion matrix, labels.

Each function draws one figure from numbers computed elsewhere and saves it as a PNG (files.write_atomically).
"""

import math
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ssdlite_jax import files  # noqa: E402

DPI = 100


def _save(fig, path):
  try:
    return files.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=DPI))
  finally:
    plt.close(fig)


def plot_results(rows: List[Dict[str, float]], path: str) -> str:
  """One panel per column of results.csv (rows: {"step", column: value or None}) against step."""
  columns = [k for k in rows[0] if k != "step"] if rows else []
  cols = 4
  fig, axes = plt.subplots(max(1, math.ceil(len(columns) / cols)), cols, figsize=(16, 3.2 * max(1, math.ceil(
      len(columns) / cols))), squeeze=False)
  for ax, name in zip(axes.flat, columns):
    points = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, marker="." if len(points) < 30 else None)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(columns):]:
    ax.axis("off")
  fig.tight_layout()
  return _save(fig, path)


def plot_pr_curves(recall: np.ndarray, precision: np.ndarray, names: Sequence[str], ap50: Sequence[float],
                   path: str) -> str:
  """Precision against recall per class at IoU 0.5 (recall [R]; precision [R, K], -1 = class without ground
  truth, not drawn); legend: class and AP50; in bold the mean over the drawn classes."""
  fig, ax = plt.subplots(figsize=(9, 7))
  drawn = [k for k in range(precision.shape[1]) if (precision[:, k] > -1).any()]
  for k in drawn:
    ax.plot(recall, np.clip(precision[:, k], 0, None), linewidth=1, label=f"{names[k]} {ap50[k]:.3f}")
  if drawn:
    mean = np.clip(precision[:, drawn], 0, None).mean(axis=1)
    ax.plot(recall, mean, color="black", linewidth=3, label=f"all classes {np.mean([ap50[k] for k in drawn]):.3f}")
  ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall at IoU 0.5")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower left", fontsize="small", ncol=1 + len(drawn) // 20)
  fig.tight_layout()
  return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], path: str) -> str:
  """Counts [K + 1, K + 1] (rows predicted, columns true, last = background) coloured by the share of each
  true class's column."""
  labels = list(names) + ["background"]
  total = matrix.sum(axis=0, keepdims=True)
  share = np.divide(matrix, total, out=np.zeros(matrix.shape), where=total > 0)
  side = min(20, 4 + 0.45 * len(labels))
  fig, ax = plt.subplots(figsize=(side + 2, side))
  image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
  if len(labels) <= 30:
    for (i, j), count in np.ndenumerate(matrix):
      if count:
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if share[i, j] > 0.5 else "black")
  ax.set_xticks(range(len(labels)), labels, rotation=90)
  ax.set_yticks(range(len(labels)), labels)
  ax.set(xlabel="true", ylabel="predicted", title="confusion matrix (colour: share of the true class)")
  fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  return _save(fig, path)


def plot_labels(gt: Dict, path: str) -> str:
  """What the training split asks for, from a COCO instances dict: objects per class, box width x height and
  box centres, both relative to their image (crowd objects left out)."""
  cats = sorted(gt["categories"], key=lambda c: c["id"])
  index = {c["id"]: k for k, c in enumerate(cats)}
  sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
  objects = [a for a in gt["annotations"] if not a.get("iscrowd") and a["image_id"] in sizes]
  counts = np.bincount([index[a["category_id"]] for a in objects], minlength=len(cats))
  rel = np.asarray([[a["bbox"][0] / sizes[a["image_id"]][0], a["bbox"][1] / sizes[a["image_id"]][1],
                     a["bbox"][2] / sizes[a["image_id"]][0], a["bbox"][3] / sizes[a["image_id"]][1]]
                    for a in objects], np.float64).reshape(-1, 4)
  fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
  axes[0].bar(range(len(cats)), counts)
  axes[0].set_xticks(range(len(cats)), [c["name"] for c in cats], rotation=90)
  axes[0].set(ylabel="objects", title=f"{len(objects)} objects in {len(sizes)} images")
  axes[1].hist2d(rel[:, 2], rel[:, 3], bins=50, range=[[0, 1], [0, 1]], cmap="Blues")
  axes[1].set(xlabel="width / image width", ylabel="height / image height", title="box sizes")
  axes[2].hist2d(rel[:, 0] + rel[:, 2] / 2, rel[:, 1] + rel[:, 3] / 2, bins=50, range=[[0, 1], [0, 1]],
                 cmap="Blues")
  axes[2].set(xlabel="x / image width", ylabel="y / image height", title="box centres")
  axes[2].invert_yaxis()
  fig.tight_layout()
  return _save(fig, path)
