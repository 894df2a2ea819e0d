"""Layer-swap ablations: a base model x swap variants x evaluations -> ``results.jsonl`` (resumable), Markdown and
CSV tables, PNG plots. ``zoo ablate SPEC`` / ``scripts/ablate.py`` on the command line; :func:`run_ablation` here.

* :mod:`zoo.ablation.spec`         the spec (YAML / JSON / dict / flags) and its validation
* :mod:`zoo.ablation.evaluations`  the evaluations by name (loss, passkey, mqar, efficiency; registrable)
* :mod:`zoo.ablation.runner`       running the cells, resuming, fine-tuning variants
* :mod:`zoo.ablation.report`       tables and plots
"""

from zoo.ablation.evaluations import EvalContext, list_evaluations, register_evaluation
from zoo.ablation.runner import AblationRun, read_results, run_ablation
from zoo.ablation.spec import AblationSpec, Evaluation, Variant, load_spec, parse_spec

__all__ = ["AblationRun", "AblationSpec", "EvalContext", "Evaluation", "Variant", "list_evaluations", "load_spec",
           "parse_spec", "read_results", "register_evaluation", "run_ablation"]
