"""UniPC's corrector on the draw's centre (corrector=True), MNIST DDPM and digits DDPM, paired seeds: is it the lever
that closes the gap to UniPC at 10 calls? Rows: covariance none + corrector (must reproduce UniPC's figures: the
equivalence on a real model), isotropic 2nd order without / with the corrector."""
import sys
import numpy as np
import torch

sys.path.insert(0, "examples")
from diffusers import DDPMPipeline
from mmgibbs import MMGibbsScheduler, MomentMatchingGibbsPipeline
import mnist_bench, mnist
import digits as dg
from mmgibbs.metrics import frechet_distance

torch.set_num_threads(1)
which = sys.argv[1]
n = int(sys.argv[2])
seeds = [0, 1, 2]
if which == "mnist":
    score = mnist_bench.MnistScore()
    pipe0 = DDPMPipeline.from_pretrained(mnist.DDPM_DIR)
    fd = lambda x: score(x)["fd"]
else:
    pipe0 = DDPMPipeline.from_pretrained(dg.DDPM_DIR)
    _, _, held, _ = dg.load_digits_split()
    clf = dg.DigitsClassifier.from_pretrained(dg.CLASSIFIER_DIR).eval()
    hf = dg.classifier_features(clf, held)
    fd = lambda x: frechet_distance(dg.classifier_features(clf, x.clamp(-1, 1)), hf)
base = dict(eta=0.0, final_output="mean", source_scheduler="DPMSolverMultistepScheduler", mean_order=2)
rows = [
    ("none + corrector (= UniPC)", dict(base, covariance="none", corrector=True)),
    ("isotropic 2M", dict(base, covariance="isotropic")),
    ("isotropic 2M + corrector", dict(base, covariance="isotropic", corrector=True)),
]
if len(sys.argv) > 3 and sys.argv[3] == "bound":  # the isotropic shrinkage's prior scale (variance_bound)
    c = dict(base, covariance="isotropic", corrector=True)
    bounds = [float(b) for b in sys.argv[5].split(",")] if len(sys.argv) > 5 else (0.1, 0.25, 0.5)
    rows = [(f"isotropic 2M + corrector, variance_bound {b}", dict(c, variance_bound=b)) for b in bounds]
    if len(sys.argv) <= 5:
        rows.append(("isotropic 2M + corrector, eta 0.2", dict(c, eta=0.2)))
if len(sys.argv) > 3 and sys.argv[3] == "noclip":  # DDPM's clip_sample off, as UniPC and DPM-Solver ignore it
    rows = [(f"{name}, no clip", dict(s, clip_sample=False)) for name, s in rows]
for steps in [int(v) for v in (sys.argv[4].split(',') if len(sys.argv) > 4 else ['10', '20'])]:
    for name, settings in rows:
        sched = MMGibbsScheduler.from_config(pipe0.scheduler.config, **settings)
        pipe = MomentMatchingGibbsPipeline(unet=pipe0.unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        vals = []
        for s in seeds:
            with torch.no_grad():
                x = pipe(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(s), output_type="latent").images
            vals.append(fd(x))
        print(f"{which} {steps} {name:32s} {np.mean(vals):.3f}  " + " / ".join(f"{v:.3f}" for v in vals), flush=True)
