"""Recipes: multi-stage pipelines (SFT -> reward model -> DPO / PPO ...) written as a list of
stages that a small runner executes in order, above the trainer (docs/recipes.md).

- runner.py: `Stage` (stages as data), `Context`, `run_stages`
- steps.py: non-training steps recipes share (oracle-labelled preferences, oracle judgement)
- demo.py: the `fastalign demo` recipe; plots.py: its summary figure
"""

from fastalign.recipes.runner import Context, Stage, TrainRun, run_stages

__all__ = ["Context", "Stage", "TrainRun", "run_stages"]
