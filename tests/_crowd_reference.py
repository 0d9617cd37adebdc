"""A loop-by-loop reading of the CrowdHuman toolkit's rules, to check the vectorised metrics.

Written for the tests from the rules (see pgd_deploy/crowd_metrics.py), one box at a time, with
plain Python lists; only the maximum matching of JI comes from scipy, as in the toolkit.
"""

from __future__ import annotations

import math


def _boxes(record):
    """[(x1, y1, x2, y2, is_object)] clipped to the image."""
    width, height = record.get("width"), record.get("height")
    out = []
    for entry in record["gtboxes"]:
        x, y, w, h = entry["fbox"]
        box = _clip((x, y, x + w, y + h), width, height)
        is_object = entry["tag"] == "person" and not (entry.get("extra") or {}).get("ignore", 0)
        out.append((*box, is_object))
    return out


def _clip(box, width, height):
    if width is None:
        return tuple(float(v) for v in box)
    x1, y1, x2, y2 = box
    return (
        min(max(x1, 0), width - 1),
        min(max(y1, 0), height - 1),
        max(min(x2, width), 0),
        max(min(y2, height), 0),
    )


def _inter(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def _area(a):
    return (a[2] - a[0]) * (a[3] - a[1])


def _iou(a, b):
    inter = _inter(a, b)
    return inter / max(_area(a) + _area(b) - inter, 1e-6)


def _ioa(a, b):
    return _inter(a, b) / max(_area(a), 1e-6)


def _dets(record, detections):
    width, height = record.get("width"), record.get("height")
    found = []
    for d in detections:
        if str(d["ID"]) == str(record["ID"]):
            x, y, w, h = d["box"]
            found.append((*_clip((x, y, x + w, y + h), width, height), d["score"]))
    return sorted(found, key=lambda d: d[4], reverse=True)


def _caltech(gts, dets):
    gts = sorted(gts, key=lambda g: g[4], reverse=True)  # objects first, each group in order
    used = [False] * len(gts)
    out = []
    for d in dets:
        best, best_j = 0.5, -1
        for j, g in enumerate(gts):
            if used[j]:
                continue
            if g[4]:
                if _iou(d, g) > best:
                    best, best_j = _iou(d, g), j
            elif best_j >= 0:
                break
            elif _ioa(d, g) > 0.5:
                best_j = j
        if best_j >= 0 and gts[best_j][4]:
            used[best_j] = True
            out.append((d[4], 1))
        elif best_j < 0:
            out.append((d[4], 0))
    return out


def reference_ap_mr(gt_records, detections):
    ranked, objects = [], 0
    for record in gt_records:
        gts = _boxes(record)
        objects += sum(1 for g in gts if g[4])
        ranked += _caltech(gts, _dets(record, detections))
    ranked.sort(key=lambda r: r[0], reverse=True)
    tp = fp = 0
    recall, precision, fppi, miss = [], [], [], []
    for _, hit in ranked:
        tp += hit
        fp += 1 - hit
        recall.append(tp / objects)
        precision.append(tp / (tp + fp))
        fppi.append(fp / len(gt_records))
        miss.append(1 - tp / objects)
    ap = sum(
        (recall[k] - recall[k - 1]) * (precision[k] + precision[k - 1]) / 2
        for k in range(1, len(recall))
    )
    if not ranked:
        return ap, 1.0
    refs = [0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000]
    logs = []
    for ref in refs:
        index = next((i for i, f in enumerate(fppi) if f >= ref), len(fppi) - 1)
        logs.append(math.log(miss[index]) if miss[index] > 0 else -math.inf)
    return ap, math.exp(sum(logs) / len(logs))


def _covered(boxes, regions):
    return sum(1 for b in boxes if regions and max(_ioa(b, r) for r in regions) > 0.5)


def reference_ji(gt_records, detections):
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    best = 0.0
    for t in range(10):
        thresh = t / 10
        ratios, counted = 0.0, 0
        for record in gt_records:
            gts = _boxes(record)
            objects = [g for g in gts if g[4]]
            regions = [g for g in gts if not g[4]]
            dets = [d for d in _dets(record, detections) if d[4] > thresh]
            pairs = []
            if dets and objects:
                iou = np.array([[_iou(d, g) for g in objects] for d in dets])
                iou[iou < 0.5] = 0
                match = maximum_bipartite_matching(csr_matrix(iou), perm_type="column")
                pairs = [(i, int(j)) for i, j in enumerate(match) if j != -1]
            free_dets = [d for i, d in enumerate(dets) if i not in {p[0] for p in pairs}]
            free_objects = [g for j, g in enumerate(objects) if j not in {p[1] for p in pairs}]
            k = len(pairs)
            m = len(objects) - _covered(free_objects, regions)
            n = len(dets) - _covered(free_dets, regions)
            ratios += k / (m + n - k) if m + n - k > 0 else 0.0
            counted += 1 if (m or n) else 0
        best = max(best, ratios / counted if counted else 1.0)
    return best
