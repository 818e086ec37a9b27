"""Community-pipeline entry point for diffusers-mmgibbs.

    pipe = DiffusionPipeline.from_pretrained(
        "google/ddpm-cifar10-32",  # or a local folder saved by any DDPM-style pipeline
        custom_pipeline="path/to/diffusers-mmgibbs/pipelines/mmgibbs_pipeline.py",
        trust_remote_code=True,  # diffusers >= 0.42 asks for it for local files too
    )
    images = pipe(batch_size=16, num_inference_steps=50, covariance="diagonal", num_probes=2).images

The loader picks the one `DiffusionPipeline` subclass defined here; the implementation lives in the installed
`mmgibbs` package (`pip install diffusers-mmgibbs`), so the equations are not copied into this file.
"""

from mmgibbs.pipeline import MomentMatchingGibbsPipeline, MomentMatchingGibbsPipelineOutput

__all__ = ["MomentMatchingGibbsPipeline", "MomentMatchingGibbsPipelineOutput"]
