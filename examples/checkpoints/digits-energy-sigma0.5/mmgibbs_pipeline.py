"""diffusers-mmgibbs: the custom-pipeline entry point diffusers loads for this folder.

Needs `pip install diffusers-mmgibbs`; load with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.
"""

from mmgibbs.pipeline import MomentMatchingGibbsPipeline, MomentMatchingGibbsPipelineOutput

__all__ = ["MomentMatchingGibbsPipeline", "MomentMatchingGibbsPipelineOutput"]
