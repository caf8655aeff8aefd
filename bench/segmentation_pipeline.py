"""Is the on-the-fly synthesis the bottleneck of a stage-3 training step? (issue 8)

Measures, with the training's own transforms (``backend.train.segmentation.build_transforms``), the
DataLoader's seconds per batch (load, 1 mm resampling, 96³ crop, augmentation, tumour synthesis in the
worker processes) and the network's seconds per optimizer step (forward + backward + step, AMP on
CUDA) on random input of the same shape, then says which one limits the training.

    python bench/segmentation_pipeline.py [--network swinunetr] [--method diffusion] [--workers 8]
        [--device auto] [--synthesis-device cpu] [--prob 0.5] [--batches 8] [--steps 10] [--roi 96]

Data: healthy toy cases cut from the shared real CT (``../shared/data``). Diffusion weights: random
weights at the official size (timing does not depend on their values) unless ``--weights DIR``.
Medians. With ``--synthesis-device cuda`` the workers are spawned and run the diffusion on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFTUMOR_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "bench"))


def _loader_seconds(cfg, items, batches: int) -> tuple[float, float]:
    """(median seconds per batch after the first, synthetic fraction) of the training DataLoader."""
    from monai.data import DataLoader, Dataset

    from backend.train.segmentation import build_transforms

    tf = build_transforms(cfg, train=True)
    tf.set_random_state(seed=0)
    workers = cfg.data.num_workers
    loader = DataLoader(Dataset(items * (batches * cfg.batch_size // len(items) + 2), tf), batch_size=cfg.batch_size,
                        shuffle=False, num_workers=workers,
                        multiprocessing_context="spawn" if cfg.synthesis.device.startswith("cuda") and workers else None)
    it = iter(loader)
    next(it)  # start-up (workers, models loaded lazily in each worker)
    times, syn = [], []
    for _ in range(batches):
        t = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - t)
        syn.append(float(batch["synthetic"].float().mean()) if "synthetic" in batch else 0.0)
    del it, loader
    return statistics.median(times), sum(syn) / len(syn)


def _step_seconds(cfg, device, steps: int) -> float:
    import torch
    from monai.losses import DiceCELoss

    from backend.segmentation.networks import NetworkConfig, build_network

    net_cfg = NetworkConfig(**{**cfg.network.__dict__, "roi_size": tuple(cfg.roi_size)})
    model = build_network(net_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.rand(cfg.batch_size, 1, *cfg.roi_size, device=device)
    y = torch.randint(0, 3, (cfg.batch_size, 1, *cfg.roi_size), device=device)
    use_amp = device.type == "cuda"
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--network", default="swinunetr", choices=("unet", "dynunet", "swinunetr"))
    ap.add_argument("--tiny", action="store_true", help="the tiny network variant (CPU smoke runs)")
    ap.add_argument("--method", default="diffusion", choices=("diffusion", "model-based"))
    ap.add_argument("--weights", type=Path, default=None, help="diffusion weights folder (default: random, official size)")
    ap.add_argument("--prob", type=float, default=0.5, help="probability that a healthy crop gets a tumour (release 0.5)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--device", default="auto", help="where the network trains (auto: cuda if present)")
    ap.add_argument("--synthesis-device", default="cpu", help="where the workers run the diffusion model")
    ap.add_argument("--roi", type=int, default=96)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=8, help="timed DataLoader batches")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from backend.data import list_cases
    from backend.segmentation.networks import NetworkConfig
    from backend.segmentation.toydata import make_toy_dataset
    from backend.train.segmentation import SegmentationConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    data = SHARED / "data" / "totalseg_abdomen_3mm"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lists = make_toy_dataset(data / "example_ct_sm.nii.gz", data / "example_seg.nii.gz", tmp / "data",
                                 n_healthy=4, n_tumor=1, seed=0)
        weights = args.weights
        if args.method == "diffusion" and weights is None:
            from synthesis import write_random_weights

            weights = tmp / "weights"
            weights.mkdir()
            write_random_weights(weights)
        cfg = SegmentationConfig(organ="liver", roi_size=[args.roi] * 3, batch_size=args.batch,
                                 network=NetworkConfig(name=args.network, tiny=args.tiny))
        cfg.data.num_workers = args.workers
        cfg.synthesis.method = args.method
        cfg.synthesis.prob = args.prob
        cfg.synthesis.weights_dir = str(weights) if weights else None
        cfg.synthesis.device = args.synthesis_device
        items = [{"image": str(c.image), "label": str(c.label), "name": c.name, "healthy": 1, "label_values": ((1,), ())}
                 for c in list_cases(lists["healthy"], require_labels=True)]
        loader_s, syn = _loader_seconds(cfg, items, args.batches)
        step_s = _step_seconds(cfg, device, args.steps)
    res = {"loader_s_per_batch": round(loader_s, 3), "step_s": round(step_s, 3), "synthetic_fraction": round(syn, 2),
           "bottleneck": "data loading / synthesis" if loader_s > step_s else "network step",
           "network": args.network + (" (tiny)" if args.tiny else ""), "method": args.method, "workers": args.workers,
           "device": str(device), "synthesis_device": args.synthesis_device, "roi": args.roi, "batch": args.batch,
           "prob": args.prob}
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"stage-3 input pipeline vs training step — {res['network']}, batch {args.batch} x {args.roi}³, "
          f"{args.method} synthesis (p {args.prob}) in {args.workers} worker(s) on {args.synthesis_device}, "
          f"network on {device}")
    print(f"  DataLoader        {loader_s:7.3f} s per batch   (synthetic fraction {syn:.2f})")
    print(f"  optimizer step    {step_s:7.3f} s per batch")
    print(f"  bottleneck: {res['bottleneck']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
