"""MMGibbsScheduler for diffusers' pipeline loader (a custom component, see model_index.json).

It needs the diffusers-mmgibbs package (`pip install diffusers-mmgibbs`); load the pipeline with
`DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`.
"""

from mmgibbs.scheduler import MMGibbsScheduler

__all__ = ["MMGibbsScheduler"]
