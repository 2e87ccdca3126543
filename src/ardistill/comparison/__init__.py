"""Teacher vs step distillation vs ARD, end to end: one comparison engine, two tasks.

A comparison records the teacher's trajectories, distils every student variant with the same budget for
every training seed, evaluates every model from the same noise and conditions, and writes a report.
The class-conditional demo (``ardistill demo``, ``ardistill sweep``) and the text-to-image demo
(``ardistill demo --task t2i``) are two configurations of it:

- ``config``: the configurations (shared fields in ``ComparisonConfig``; ``CompareConfig``, ``T2IConfig``)
  and the demos' presets;
- ``benchmarks``: what a comparison is measured on (digits, photos, your own folder; the two-digit pairs);
- ``variants``: the students compared (step distillation, ARD, the paper's comparison);
- ``stages``: recording, training and evaluation as both tasks run them;
- ``classes`` (with ``gan``, the GAN stage) and ``text``: what is specific to class labels and to captions;
- ``report``: report.md / metrics.json of both tasks; ``sweep``: the ablations.
"""

from ardistill.comparison.benchmarks import BENCHMARKS, DIGIT_PAIRS, Benchmark, FolderBenchmark, get_benchmark
from ardistill.comparison.classes import compare, load_eval_set, record_sets
from ardistill.comparison.config import (BENCHMARK_PRESETS, DEMO_PRESETS, FOLDER_PRESETS, PHOTOS_PRESETS, T2I_PRESETS,
                                         CompareConfig, ComparisonConfig, T2IConfig, t2i_config)
from ardistill.comparison.gan import GAN_CONTROL_ROW, GAN_ROW, finetune_variant, gan_settings
from ardistill.comparison.report import summarize
from ardistill.comparison.stages import train_variant, training_key
from ardistill.comparison.sweep import SWEEP_AXES, sweep, sweep_variants
from ardistill.comparison.text import compare_t2i
from ardistill.comparison.variants import comparison_variants, demo_variants, slug, t2i_variants

__all__ = ["BENCHMARKS", "BENCHMARK_PRESETS", "DEMO_PRESETS", "DIGIT_PAIRS", "FOLDER_PRESETS", "GAN_CONTROL_ROW",
           "GAN_ROW", "PHOTOS_PRESETS", "SWEEP_AXES", "T2I_PRESETS", "Benchmark", "CompareConfig", "ComparisonConfig",
           "FolderBenchmark", "T2IConfig", "compare", "compare_t2i", "comparison_variants", "demo_variants",
           "finetune_variant", "gan_settings", "get_benchmark", "load_eval_set", "record_sets", "slug", "summarize",
           "sweep", "sweep_variants", "t2i_config", "t2i_variants", "train_variant", "training_key"]
