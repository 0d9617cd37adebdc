"""Serving: batch inference (`pgd-serve predict`) and the teacher-vs-student web demo.

Nothing is imported here. `sources`, `batcher`, `draw` and `predictor` need only the standard
library, numpy and PIL (tqdm and pycocotools are imported lazily when used); `gradio_app` imports
gradio inside its builder, so a serving container needs neither torch nor, for batch inference,
gradio.
"""
