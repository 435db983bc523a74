"""Measure what Point-M2AE's two official-semantics switches change, on the same weights and inputs.

    OMP_NUM_THREADS=1 python bench/m2ae_official_switches.py [--config cfgs/pretrain/point_m2ae.yaml]
        [--batch 2 8] [--out docs/results/m2ae_official_switches.json]

``official_padding`` (the official pre-training attention mask ``mask_radius * mask_vis``) and
``official_index0`` (the official scatter that unmasks token 0 of sample 0) are each turned on alone
against the fixed model (both off), then together. The model is the config's, randomly initialised
(seed 0), in eval mode (no stochastic depth; BatchNorm with its initial statistics), on generated
shapes (SyntheticShapes, 16 classes, rotated, 30 % partial) at the config's point count. Reported: the
largest absolute difference of the encoder tokens at the slots both models keep, relative to the
largest token magnitude; the relative loss difference; the number of second-scale tokens whose
mask differs; and, on the evaluation path, the largest difference of the linear-SVM feature.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from datasets.synthetic.dataset import SyntheticShapes
from models import build_model
from utils.config import load_config

SETTINGS = {"fixed": (False, False), "official_padding": (True, False), "official_index0": (False, True),
            "official": (True, True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="cfgs/pretrain/point_m2ae.yaml")
    p.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    p.add_argument("--seeds", type=int, default=3, help="mask draws per batch size")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    models = {}
    for name, (pad, idx0) in SETTINGS.items():
        m = {**cfg["model"], "NAME": "Point_M2AE", "official_padding": pad, "official_index0": idx0}
        m.pop("gm3d", None)
        m["mask"] = {k: v for k, v in dict(m.get("mask", {})).items() if k in ("strategy", "ratio", "count")}
        if m["mask"].get("strategy") == "gm3d":
            m["mask"]["strategy"] = "random"
        torch.manual_seed(0)
        models[name] = build_model(m).eval()
    ref = models["fixed"].state_dict()
    for mdl in models.values():
        mdl.load_state_dict(ref)
    npts = int(cfg["npoints"])
    data = SyntheticShapes("train", npoints=npts, num_classes=16, samples_per_class=2, rotate=True,
                           partial=0.3, noise=0.01, base_points=max(2048, npts))
    rows = []
    for B in args.batch:
        for seed in range(args.seeds):
            pts = torch.stack([data[(seed * B + i) % len(data)]["points"] for i in range(B)])
            base = models["fixed"]
            groups = base.group(pts)
            mask = base.masker(groups[-1].center, generator=torch.Generator().manual_seed(seed), epoch=0)
            res = {}
            with torch.no_grad():
                for name, mdl in models.items():
                    enc = mdl.encode(groups, mask)
                    _, x = mdl.decode(groups, enc, mask)
                    loss = float(mdl.fine_token_loss(groups, enc, x)[0].mean())
                    res[name] = (enc, loss, mdl.extract_features(pts))
            f_enc, f_loss, f_feat = res["fixed"]
            for name in ("official_padding", "official_index0", "official"):
                enc, loss, feat = res[name]
                tok_abs, tok_rel = 0.0, 0.0
                for s, (a, b) in enumerate(zip(enc.tokens, f_enc.tokens)):
                    both = (~enc.masks[s]) & (~f_enc.masks[s])
                    ta = a.new_zeros(*both.shape, a.shape[-1])
                    tb = ta.clone()
                    ta[~enc.masks[s]] = a[enc.valid[s]]
                    tb[~f_enc.masks[s]] = b[f_enc.valid[s]]
                    d = float((ta - tb)[both].abs().max()) if both.any() else 0.0
                    tok_abs = max(tok_abs, d)
                    tok_rel = max(tok_rel, d / float(tb[both].abs().max()))
                rows.append({"batch": B, "seed": seed, "switch": name, "token_max_abs": tok_abs,
                             "token_max_rel": tok_rel, "loss_fixed": f_loss, "loss": loss,
                             "loss_rel": abs(loss - f_loss) / f_loss,
                             "mask_tokens_changed_scale1": int((enc.masks[1] != f_enc.masks[1]).sum()),
                             "mask_tokens_changed_all": int(sum((a != b).sum() for a, b in zip(enc.masks, f_enc.masks))),
                             "svm_feature_max_abs": float((feat - f_feat).abs().max()),
                             "svm_feature_max_rel": float((feat - f_feat).abs().max() / f_feat.abs().max())})
                r = rows[-1]
                print(f"B={B} seed={seed} {name:17s} tokens {r['token_max_abs']:.3g} ({100 * r['token_max_rel']:.2f} %)"
                      f"  loss {100 * r['loss_rel']:.3f} %  mask tokens changed {r['mask_tokens_changed_all']}"
                      f"  svm feature {r['svm_feature_max_abs']:.3g}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": args.config, "threads": 1, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
