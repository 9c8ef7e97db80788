#!/usr/bin/env python3
"""Issue 22: local (patch-level, PatchCore-style) unknown scores against the device's `similarity`.

The draws, taught classes, stores and the device's `similarity` are measure_openscore.py's (the same
seeds, `draw`, `teach`, seen / support / query split; `similarity` checked against the store's on
every query). Each photo is also run once through the model as the device sees it (view 0 of
`augmented_views`) and its spatial maps are cached (uint8, as the interpreter holds them, one
``.npz`` per model, photo list and layer under ~/.cache/edgeknn/patch/). On those:

- `patch-L-nN-C` (PatchCore): layer L's map (`c13` = Conv2d_13_pointwise, the 6x6x768 map the
  embedding averages; `c12` = Conv2d_12_pointwise 6x6x768; `c11` / `c10` = Conv2d_11 / _10_pointwise
  12x12x384; `c11s2` / `c10s2`: those at every second row and column, 6x6), each position's feature
  optionally averaged over its 3x3 neighbourhood (`n3`, as PatchCore; `n1`: not), L2-normalised
  (`u`), or also centred (`c`) on the mean patch of the frames the device has observed (the seen
  photos and the taught examples' frames, as the device centres on its running mean) and normalised
  again. The memory is every patch of every taught example (all taught classes together). A
  query's anomaly per patch = 1 - its largest cosine to the memory; over its patches the largest
  (`max`) or the mean of the top 10 % (`top`); score = -anomaly. Calibrated as a device could from
  its examples alone: each example's score against the memory without its own patches
  (leave-one-out), the ``--quantile`` of those.
- `patch+similarity`: `similarity` - w x the chosen patch score's anomaly, calibrated by
  measure_openscore's `calibrated` with each example's leave-one-out anomaly as its `less`.
- `gem-3` / `max-pool`: the 6x6 c13 map pooled by GeM (p=3) or max instead of the average, the
  global embedding replaced, through the same `similarity` machinery and calibration.

For each: AUROC mean ± std, paired difference to `similarity`, rej@kept (measure_openscore's), and
rej/kept with the device-computable calibration. Seeds 0..9 are the first ten of the twenty, so one
run with ``--seeds 20`` reports both (``--report 10,20``). ``--sweep``: the grid the knobs are chosen
from (quantiles, w), for choosing on 0-4.

    python scripts/measure_patchscore.py --classes 0,1,2,3,4 --seeds 20 --sweep   # the choice
    python scripts/measure_patchscore.py --classes 5,6,7,8,9 --seeds 20           # reported, once
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeknn.cli.evaluate import auroc, default_cache  # noqa: E402
from edgeknn.cli.photoset import Dataset, load_dataset, only  # noqa: E402
from edgeknn.imagefiles import load_rgb  # noqa: E402
from edgeknn.model.embedder import Embedder, augmented_views  # noqa: E402
from edgeknn.model.tflite import Model, TensorInfo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_openscore import (  # noqa: E402
    at_kept,
    calibrated,
    centred,
    feats,
    mean_top,
    parser,
    rates,
    taught_stores,
)

K = 3
LAYERS = {  # short name: the op whose Relu6 output is read (found by name, never by index)
    "c13": "Conv2d_13_pointwise",
    "c12": "Conv2d_12_pointwise",
    "c11": "Conv2d_11_pointwise",
    "c10": "Conv2d_10_pointwise",
}
TOP = 0.1  # `top`: the mean of the top 10 % of a frame's patch anomalies
CHUNK = 1 << 13  # query patches per matmul block


# ---- the patch maps, as the device's interpreter holds them -------------------------------------


def layer_tensor(model: Model, op: str) -> TensorInfo:
    """The 4-d Relu6 output of ``op`` (e.g. Conv2d_13_pointwise): its fused name starts with it."""
    for d in model.interpreter.get_tensor_details():
        first = d["name"].split(";")[0]
        if first.endswith(f"/{op}/Relu6") and len(d["shape"]) == 4:
            return TensorInfo.of(d)
    raise SystemExit(f"{model.path}: no tensor {op}/Relu6")


def patch_cache(cache: Path, sha: str, files: list[Path], layer: str) -> Path:
    """One file per model (sha256), photo list (path, size, time) and layer."""
    h = hashlib.sha256(f"{sha}\nview0\n{layer}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return cache / f"{layer}-{sha[:12]}-{h.hexdigest()[:16]}.npz"


def load_maps(files: list[Path], model_path: Path, layers: list[str], cache: Path) -> dict[str, np.ndarray]:
    """Per layer, the dequantized (photos, H, W, C) float32 maps of each photo's frame (view 0 of
    ``augmented_views``: the frame as the model sees it), one invoke per photo, cached as uint8."""
    model = Model(model_path, preserve_all_tensors=True)
    info = {name: layer_tensor(model, LAYERS[name]) for name in layers}
    paths = {name: patch_cache(cache, model.sha256, files, name) for name in layers}
    raw: dict[str, np.ndarray] = {}
    for name, p in paths.items():
        if p.is_file():
            with np.load(p) as z:
                raw[name] = z["maps"]
    missing = [n for n in layers if n not in raw]
    if missing:
        maps = {n: np.zeros((len(files), *info[n].shape[1:]), np.uint8) for n in missing}
        start = time.perf_counter()
        for j, path in enumerate(files):
            image = load_rgb(path, max_side=2 * max(model.input_size))
            model.invoke(augmented_views(image, model.width / model.height)[0])
            for n in missing:
                maps[n][j] = model.interpreter.get_tensor(info[n].index)[0]
            if j % 200 == 0:
                print(
                    f"  patch maps: {j}/{len(files)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr
                )
        cache.mkdir(parents=True, exist_ok=True)
        for n in missing:
            part = paths[n].with_suffix(".part.npz")
            np.savez(part, maps=maps[n], scale=info[n].scale, zero_point=info[n].zero_point)
            part.replace(paths[n])
            raw[n] = maps[n]
    return {n: (raw[n].astype(np.float32) - info[n].zero_point) * np.float32(info[n].scale) for n in layers}


def neighbourhood(maps: np.ndarray, size: int) -> np.ndarray:
    """Each position's feature averaged over its ``size`` x ``size`` neighbourhood (the positions that
    exist: at the border fewer), as PatchCore's local aggregation."""
    if size == 1:
        return maps
    r = size // 2
    n, h, w, c = maps.shape
    total = np.zeros_like(maps)
    count = np.zeros((1, h, w, 1), np.float32)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
            xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
            total[:, yd, xd] += maps[:, ys, xs]
            count[:, yd, xd] += 1
    return total / count


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pooled(maps: np.ndarray, how: str) -> np.ndarray:
    """The 6x6 map pooled to an embedding (unit rows, as ``Embedder.embedding``)."""
    flat = maps.reshape(len(maps), -1, maps.shape[-1]).astype(np.float64)
    if how == "avg":
        v = flat.mean(1)
    elif how == "gem-3":
        v = np.cbrt((flat**3).mean(1))
    else:
        v = flat.max(1)
    return unit(v)


# ---- PatchCore ------------------------------------------------------------------------------------


def nearest_cos(q: np.ndarray, mem: np.ndarray) -> np.ndarray:
    """Per row of ``q`` (unit), its largest cosine to a row of ``mem`` (unit), in blocks."""
    out = np.empty(len(q), np.float32)
    mt = np.ascontiguousarray(mem.T)
    for s in range(0, len(q), CHUNK):
        out[s : s + CHUNK] = (q[s : s + CHUNK] @ mt).max(1)
    return out


def aggregate(anom: np.ndarray) -> dict[str, np.ndarray]:
    """A frame's anomaly from its patches' (frames, patches): the largest, the mean of the top 10 %."""
    top = max(1, math.ceil(TOP * anom.shape[1]))
    return {"max": anom.max(1), "top": -np.sort(-anom, axis=1)[:, :top].mean(1)}


def patch_scores(
    f: np.ndarray, query: np.ndarray, support: np.ndarray, observed: np.ndarray, centre: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per aggregation, the queries' anomalies and each support example's leave-one-out anomaly
    (against the memory without its own patches). ``f``: (photos, patches, C) unit patches."""
    p = f.shape[1]
    if centre:
        c = f[observed].reshape(-1, f.shape[-1]).mean(0)
        q, mem = unit(f[query] - c), unit(f[support] - c)
    else:
        q, mem = f[query], f[support]
    mem_flat = mem.reshape(-1, mem.shape[-1])
    q_anom = 1 - nearest_cos(q.reshape(-1, q.shape[-1]), mem_flat).reshape(len(query), p)
    sims = mem_flat @ mem_flat.T
    own = np.repeat(np.arange(len(support)), p)
    sims[own[:, None] == own[None, :]] = -np.inf
    loo = 1 - sims.max(1).reshape(len(support), p) if len(support) > 1 else np.zeros((1, p))
    qa, la = aggregate(q_anom), aggregate(loo)
    return {k: (qa[k], la[k]) for k in qa}


# ---- the runs -------------------------------------------------------------------------------------


def collect(
    data: Dataset, maps: dict[str, np.ndarray], variants: list[str], shots: int, seeds: int
) -> dict[str, list[dict]]:
    """Per scenario, one record per seed: what every score needs (queries' scores, truth, the
    store's right answers, calibration inputs)."""
    n_classes = len(data.classes)
    v = data.views.astype(np.float64)
    pools = {how: pooled(maps["c13"], how) for how in ("avg", "gem-3", "max-pool")}
    corr = np.mean(np.sum(pools["avg"] * unit(v[:, 0]), 1))
    assert corr > 0.999, f"c13 averaged is not the embedding: mean cosine {corr}"
    feats_by = {}
    for var in variants:  # e.g. c13-n3: the layer and its neighbourhood (-sqrt: square-rooted first)
        layer, nb, *rest = var.split("-")
        m = maps[layer.removesuffix("s2")]
        m = neighbourhood(m, int(nb[1:]))
        if layer.endswith("s2"):
            m = m[:, ::2, ::2]
        if "sqrt" in rest:  # as the device's head does to the embedding (a Hellinger-like map)
            m = np.sqrt(np.maximum(m, 0))
        feats_by[var] = unit(m.reshape(len(m), -1, m.shape[-1])).astype(np.float32)
    out: dict[str, list[dict]] = {}
    for _, name, d, taught, store, preds, closed in taught_stores(data, shots, seeds):
        seen_idx = np.concatenate([d.seen[c] for c in range(n_classes)])
        truth = data.labels[d.query]
        support = np.concatenate([d.support[c] for c in taught])
        observed = np.concatenate([seen_idx, support])
        ex_labels = data.labels[support]
        rec: dict = {
            "taught": np.isin(truth, taught),
            "right": closed == np.array(data.classes)[truth],
            "ex_labels": ex_labels,
            "device_thr": store.effective_threshold,
        }
        f = v[:, 0]
        c = feats(f[observed]).mean(axis=0)
        ex = centred(f[support], c)
        score = mean_top(centred(f[d.query], c) @ ex.T)
        device = np.array([p.similarity for p in preds])
        assert np.allclose(score, device, atol=2e-3), np.abs(score - device).max()
        rec["similarity"] = score
        rec["sim_ex"] = ex  # for the combination's calibration
        for how in ("gem-3", "max-pool"):
            x = pools[how]
            c2 = feats(x[observed]).mean(axis=0)
            ex2 = centred(x[support], c2)
            rec[how] = (mean_top(centred(x[d.query], c2) @ ex2.T), calibrated(ex2, ex_labels))
        for var, fv in feats_by.items():
            for cen in (False, True):
                for agg, pair in patch_scores(fv, d.query, support, observed, cen).items():
                    rec[f"patch-{var}-{'c' if cen else 'u'}-{agg}"] = pair
        out.setdefault(name, []).append(rec)
    return out


def patch_threshold(loo: np.ndarray, quantile: float) -> float:
    """A patch score's threshold from the examples alone: the ``quantile`` of their leave-one-out
    scores (-anomaly), less scan.py's allowance (0.5 / examples, as ``calibrated``)."""
    return float(np.quantile(-loo, quantile)) - 0.5 / len(loo)


def runs_for(recs: list[dict], key: str, quantile: float, w: float = 0.0, patch: str = "") -> list[tuple]:
    """measure_openscore's run tuples (score, taught, right, threshold) for one score."""
    out = []
    for r in recs:
        if key == "similarity":
            out.append((r["similarity"], r["taught"], r["right"], r["device_thr"]))
        elif key in ("gem-3", "max-pool"):
            out.append((r[key][0], r["taught"], r["right"], r[key][1]))
        elif key == "patch+similarity":
            qa, la = r[patch]
            thr = calibrated(r["sim_ex"], r["ex_labels"], w * la)
            out.append((r["similarity"] - w * qa, r["taught"], r["right"], thr))
        else:
            qa, la = r[key]
            out.append((-qa, r["taught"], r["right"], patch_threshold(la, quantile)))
    return out


def line(key: str, runs: list[tuple], base: np.ndarray, kept_at: float) -> str:
    au = np.array([auroc(s, t) for s, t, _, _ in runs])
    rej, kept = rates(runs)
    diff = au - base
    return (
        f"  {key:<30} auroc {au.mean():.3f} ± {au.std():.3f} (paired {diff.mean():+.3f}"
        f" [{diff.min():+.3f}, {diff.max():+.3f}], higher in {(diff > 0).sum()}/{len(diff)})"
        f"  rej@kept {at_kept(runs, kept_at):.3f}"
        f"  rej {rej.mean():.3f} ± {rej.std():.3f}  kept {kept.mean():.3f} ± {kept.std():.3f}"
    )


def cost(maps: dict[str, np.ndarray], variants: list[str]) -> None:
    """Memory patches per taught example and multiply-adds per frame with 5 classes x 10 shots."""
    print("cost, 5 classes x 10 shots (50 examples), one frame:")
    for var in variants:
        layer = var.split("-")[0]
        _, h, w, ch = maps[layer.removesuffix("s2")].shape
        if layer.endswith("s2"):
            h, w = (h + 1) // 2, (w + 1) // 2
        p = h * w
        macs = p * 50 * p * ch
        gflop = 2 * macs / 1e9
        print(
            f"  {var:<10} {p} patches x {ch} per example; memory {50 * p} x {ch}"
            f" ({50 * p * ch / 1e6:.2f} M values); per frame {p} x {50 * p} x {ch} = {macs / 1e6:.1f} M"
            f" multiply-adds = {gflop:.3f} GFLOP: {gflop / 2 * 1e3:.0f}-{gflop * 1e3:.0f} ms at 2-1 GFLOP/s"
        )


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--report", default="10,20", help="report the first N seeds of the run, for each N")
    p.add_argument("--variants", default="c13-n1,c13-n3,c12-n1,c12-n3,c11s2-n3,c10s2-n3")
    # the defaults: what was chosen on digits 0-4 (docs/classifying.md)
    p.add_argument("--patch", default="patch-c13-n3-sqrt-c-top", help="the patch score of the combination")
    p.add_argument("--quantile", type=float, default=0.15, help="the patch scores' calibration quantile")
    p.add_argument("--w", type=float, default=0.5, help="the combination's weight")
    p.add_argument("--kept", type=float, default=0.93)
    p.add_argument("--sweep", action="store_true", help="the grid of quantiles and w (for 0-4)")
    p.add_argument("--cache", type=Path, default=default_cache().parent / "patch")
    p.add_argument("--records", type=Path, help="keep the collected runs here (read back if there)")
    a = p.parse_args()
    names = a.classes.split(",")
    full = load_dataset(a.data, Embedder(a.model), cache=default_cache())
    keep = np.isin(full.labels, [full.classes.index(n) for n in names])
    data = only(full, names)
    variants = a.variants.split(",")
    layers = sorted({v.split("-")[0].removesuffix("s2") for v in variants} | {"c13"})
    maps_all = load_maps(full.files, a.model, layers, a.cache)
    maps = {n: m[keep] for n, m in maps_all.items()}
    del maps_all
    reports = [int(s) for s in a.report.split(",")]
    print(
        f"{a.model.name}, classes {a.classes}, seeds {a.report} (of {a.seeds}), rej@kept at kept {a.kept};"
        f" patch quantile {a.quantile}, combination {a.patch} w {a.w}"
    )
    cost(maps, variants)
    for shots in [int(s) for s in a.shots.split(",")]:
        collected = records(a, data, maps, variants, shots)
        for n in reports:
            for scenario, all_recs in collected.items():
                recs = all_recs[:n]
                print(f"taught {scenario}, {shots} shots, {n} seeds")
                base = np.array([auroc(r["similarity"], r["taught"]) for r in recs])
                keys = ["similarity", "gem-3", "max-pool"]
                keys += sorted(k for k in recs[0] if k.startswith("patch-"))
                for key in keys:
                    print(line(key, runs_for(recs, key, a.quantile), base, a.kept))
                print(
                    line(
                        "patch+similarity", runs_for(recs, "patch+similarity", 0, a.w, a.patch), base, a.kept
                    )
                )
                if a.sweep:
                    sweep(recs, keys, base, a)
    return 0


def records(a, data: Dataset, maps: dict[str, np.ndarray], variants: list[str], shots: int) -> dict:
    """``collect``'s runs, or with ``--records`` the ones kept from the same arguments before (an
    ``.npz`` of plain arrays: nothing here is unpickled)."""
    path = a.records.with_suffix(f".{shots}.npz") if a.records else None
    args = [a.classes, a.seeds, variants]
    if path is not None and path.is_file():
        kept_args, runs = _read_records(path)
        if kept_args == args:
            return runs
    start = time.perf_counter()
    runs = collect(data, maps, variants, shots, a.seeds)
    print(f"  ({shots} shots collected in {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if path is not None:
        _write_records(path, args, runs)
    return runs


def _write_records(path: Path, args: list, runs: dict[str, list[dict]]) -> None:
    """Each record's value (an array, a number, or a pair of them) as arrays named
    ``scenario/run/key/part/parts``."""
    arrays = {"args": np.array(json.dumps(args))}
    for scenario, recs in runs.items():
        for i, rec in enumerate(recs):
            for key, value in rec.items():
                parts = value if isinstance(value, tuple) else (value,)
                for j, part in enumerate(parts):
                    arrays[f"{scenario}/{i}/{key}/{j}/{len(parts)}"] = np.asarray(part)
    np.savez(path, **arrays)


def _read_records(path: Path) -> tuple[list, dict[str, list[dict]]]:
    runs: dict[str, list[dict]] = {}
    with np.load(path, allow_pickle=False) as z:
        args = json.loads(str(z["args"]))
        for name in z.files:
            if name == "args":
                continue
            scenario, i, key, j, n = name.split("/")
            recs = runs.setdefault(scenario, [])
            recs.extend({} for _ in range(int(i) + 1 - len(recs)))
            value = z[name].item() if z[name].ndim == 0 else z[name]
            if n == "1":
                recs[int(i)][key] = value
            else:
                recs[int(i)].setdefault(key, [None] * int(n))[int(j)] = value
    for recs in runs.values():
        for rec in recs:
            rec.update({k: tuple(v) for k, v in rec.items() if isinstance(v, list)})
    return args, runs


def sweep(recs: list[dict], keys: list[str], base: np.ndarray, a) -> None:
    """The knobs' grid on this run: each patch score's rej/kept per quantile, the combination per w."""
    for key in keys:
        if not key.startswith("patch-"):
            continue
        cells = []
        for q in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3):
            rej, kept = rates(runs_for(recs, key, q))
            cells.append(f"q{q}: {rej.mean():.3f}/{kept.mean():.3f}")
        print(f"    sweep {key:<26} " + "  ".join(cells))
    for patch in [k for k in keys if k.startswith("patch-")]:
        for w in (0.25, 0.5, 1.0, 2.0):
            runs = runs_for(recs, "patch+similarity", 0, w, patch)
            au = np.array([auroc(s, t) for s, t, _, _ in runs])
            rej, kept = rates(runs)
            print(
                f"    sweep w {w:<4} {patch:<26}: auroc {au.mean():.3f} (paired {(au - base).mean():+.3f},"
                f" higher in {((au - base) > 0).sum()}/{len(au)}) rej@kept {at_kept(runs, a.kept):.3f}"
                f"  rej {rej.mean():.3f} kept {kept.mean():.3f}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
