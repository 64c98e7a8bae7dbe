"""The command line's help texts: per command a one-line summary, a description, its own config
settings (run commands) and a worked example; the rule for relative paths; and the reference of
every config field, which the run commands' help ends with."""

from __future__ import annotations

__all__ = ["SUMMARIES", "DESCRIPTIONS", "RUN_SETTINGS", "EXAMPLES", "OUTPUTS", "PATHS", "CONFIG_REFERENCE"]

SUMMARIES = {
    "demo": "run the whole story on a bundled offline zoo (default: the language-model zoo); write report and plots",
    "zoo": "build (or load) a bundled model zoo and describe it",
    "map": "MAP: spend a budget of real evaluations where the front grows most, model it, pick (models and settings in a config)",
    "bayes": "Bayesian MAP: adaptive sampling around quadratic surrogates (models and settings in a config)",
    "nested": "nested merging: pairwise stages for the config's preference (models and settings in a config)",
    "moe": "PWE-MoE: train preference routers, save the unloaded model for the config's preference (a config)",
    "save": "save a merged model for given coefficients (or a preference) as a Hugging Face folder",
}

OUTPUTS = """outputs: the config's 'out' folder gets result.json, front.png and merged/, the model picked for the
  config's preference as a Hugging Face folder (AutoModelForCausalLM / AutoModel.from_pretrained loads it;
  nested writes no front.png), and report.md + report.json: the pick's coefficients, its predicted metrics
  +- std, one real evaluation of the saved merged/ weights, and a table against the base, each expert, the
  best uniform merge and your mergekit recipe (these evaluations are outside the budget). The evaluation store (out/evaluations.sqlite) is kept: a rerun re-evaluates
  nothing and loads no model it does not need; an interrupted run resumes (Ctrl-C prints the command). The
  whole config is checked before any model loads; a config error creates nothing.
"""

DESCRIPTIONS = {
    "demo": "Run every method on a bundled offline zoo and write report.md, report.json and plots to --out.",
    "zoo": "Build (first use) or load a bundled zoo and print its tasks and task-vector cosine similarities.",
    "map": "MAP: evaluate merges (the experts first, then one at a time where the expected gain in the front's\n"
           "hypervolume is largest under Gaussian-process models of the metrics; the last evaluation on the model's\n"
           "pick for the config's preference), search the models' Pareto front and save the model picked for the\n"
           "preference. 'budget' is the total of real evaluations. 'sampling: design' runs the MAP authors' plan\n"
           "instead (one design, quadratic surrogates, up to 10 of the budget re-evaluating front points).",
    "bayes": "Bayesian MAP: adaptive sampling with the quadratic surrogates as the Gaussian processes' mean\n"
             "('budget' real evaluations in all); saves the model picked for the config's preference.",
    "nested": "Nested merging: merge two task groups at a time, each stage searched for the config's preference;\n"
              "saves the one model it finds.",
    "moe": "PWE-MoE: train preference-conditioned routers over the task vectors, score the unloaded models\n"
           "across preferences and save the one for the config's preference.",
    "save": "Save the merge for given coefficients (--coeffs), or the point a finished map/bayes run's front\n"
            "picks for a preference (--preference), as a Hugging Face folder or one .safetensors file\n"
            "(map_merge.json inside names the coefficients, the method and the sources).",
}

RUN_SETTINGS = {
    "map": "Its settings (config fields; every field is listed at the end):\n"
           "  budget: 22             real evaluations in all (default (T+1)(T+2))\n"
           "  sampling: adaptive     adaptive / design (the authors' one-shot design + quadratic surrogates)\n"
           "  design: sobol          how the first samples are placed: sobol (experts + Sobol) / map / lhs\n"
           "  num_samples: 12        older name of budget, with sampling: design",
    "bayes": "Its settings (config fields; every field is listed at the end):\n"
             "  budget: 16             real evaluations in all\n"
             "  acquisition: ehvi      ehvi / nehvi / binned\n"
             "  design: map            how the first samples are placed: map / sobol / lhs",
    "nested": "Its settings (config fields; every field is listed at the end):\n"
              "  preference: [1, 2]     the target: one weight per task\n"
              "  samples_per_stage: 10  real evaluations per pairwise stage\n"
              "  schedule: sequential   sequential (one pair at a time) / levels (disjoint pairs at once)",
    "moe": "Its settings (config fields; every field is listed at the end):\n"
           "  moe_method: ls         ls / epo: the routers' training objective\n"
           "  moe_steps: 2000        router training steps\n"
           "  train_loss: my_eval.py:loss   on own models: loss(model, task) -> scalar tensor on a training batch\n"
           "  upcycle: mlp           on own models: mlp / all / a regex over module names",
}

EXAMPLES = {
    "demo": "examples:\n  map-merge demo --out outputs/demo          # the zoo built once (minutes), the demo about 4 minutes on 2 CPU\n"
            "                                             # cores; report.md, report.json, plots (a rerun reads it all back)\n"
            "  map-merge demo --zoo vision --out outputs/vision   # a one-minute preview\n",
    "zoo": "example:\n  map-merge zoo lm --tasks code medical      # builds the zoo once (minutes), then loads it from the cache\n",
    "map": """example:
  map-merge map --config runs/lm.yaml
  with runs/lm.yaml (paths relative to runs/):
    pretrained: models/base              # a Hugging Face folder, .safetensors, .bin or .pt
    finetuned: {code: models/code, medical: models/medical-lora}
    tasks:
      code: {kind: loss, data: data/code_val.jsonl, max_length: 512}
      medical: {kind: loss, data: data/medical_val.jsonl, max_length: 512}
    method: {name: ties, k: 0.6, scope: tensor}
    budget: 22                           # real evaluations in all
    preference: [1, 1]
    out: results/lm                      # -> runs/results/lm/result.json, front.png, merged/
  then: map-merge save --config runs/lm.yaml --preference 1,3 --out pick/   (another point of the front)
""",
    "bayes": """example:
  map-merge bayes --config run.yaml
  with run.yaml:
    zoo: lm                              # the bundled language-model zoo
    tasks: [code, medical]
    budget: 16
    preference: [1, 1]
    out: results/bayes                   # beside run.yaml
""",
    "nested": """example:
  map-merge nested --config run.yaml
  with run.yaml:
    zoo: lm
    tasks: [code, medical, legal]
    preference: [2, 1, 1]                # the one model nested merging searches for
    samples_per_stage: 10
""",
    "moe": """example:
  map-merge moe --config run.yaml
  with run.yaml:
    zoo: vision
    tasks: [rotated, mirrored_parity]
    moe_steps: 500
    preference: [1, 1]                   # the unloaded model saved as merged/
""",
    "save": """examples:
  map-merge save --config run.yaml --coeffs 0.4,0.7                 # -> <out>/merged/ of run.yaml
  map-merge save --config run.yaml --coeffs -0.2,1.1 --out neg/     # negative coefficients need no '='
  map-merge save --config run.yaml --preference 1,3 --out pick/     # the front of a finished map/bayes run
  map-merge save --config run.yaml --coeffs 0.5,0.5 --method "{name: ties, k: 0.6, scope: tensor}" --emit-mergekit pick.yaml
  map-merge save text --coeffs 0.4,0.7 --tasks sentiment med_subject --out merged/   # a bundled zoo
With --config, save then prints the saved model's report block: its prediction, one real evaluation of the
saved weights and the comparison as the run's store holds it (the store is read; nothing else is written).
Config fields: map-merge map --help.
""",
}

PATHS = """relative paths: inside a config file (models, evaluator and model code, data, tokenizer, out, store)
  they are relative to the config file's folder; in a mergekit recipe, to the recipe's folder; on the
  command line (--config, --mergekit, --out, --emit-mergekit), to the working directory. Without 'out',
  a command writes to outputs/<command>/ beside the config.
"""

CONFIG_REFERENCE = """config fields (YAML or JSON):

Your own models::

    pretrained: base/                   # HF folder, .safetensors, .bin or .pt
    finetuned:                          # task -> fine-tuned model: HF folder, file, or PEFT LoRA adapter folder
      task_a: a/
      task_b: b-lora/
    evaluator: my_eval.py:evaluate      # evaluate(model, task) -> float, or "package.module:function"
    model: my_eval.py:build             # optional: build() -> nn.Module (default: the class config.json names, else AutoModel,
                                        #   AutoModelForCausalLM with metric specs under 'tasks'); required when
                                        #   'pretrained' is a weights file. Built only when a merge is first evaluated.
    sense: max                          # or min (the evaluator's score is a loss)
    link: identity                      # surrogate link: sigmoid / softplus / identity

Language models need no Python: ``tasks`` maps each task to a metric spec (then no 'evaluator')::

    tasks:
      code: {kind: loss, data: code_val.jsonl, max_length: 512, batch_size: 8, perplexity: false}
      qa:   {kind: lm_eval, task: tasks/qa.yaml, limit: 200, metric: acc, num_fewshot: 0, batch_size: 8, noisy: true}
    tokenizer: base/                    # default: the pretrained folder
    dtype: bfloat16                     # float32 / bfloat16 / float16: the live model's dtype

Held-out data for ``kind: loss``: a ``.jsonl`` file with one JSON object per line holding the text
under ``"text"`` (``{"text": "def f(x): ..."}``), a ``.txt`` file with one text per line, or a
``.json`` list of such objects. ``kind: lm_eval``: a registered lm-evaluation-harness task name
or a local task YAML (``dataset_path: json`` with local ``data_files``: how it runs offline).
An lm-eval score on a sample of questions is a noisy estimate (``noisy: true``, the default): the
model handed over is chosen by MAP's model at the real evaluations, not by their lucky measurements.

Or a bundled zoo (models, data and metrics come with it)::

    zoo: lm                             # the language-model zoo (held-out losses, lower is better); or text, vision
    tasks: [code, medical]              # default: the zoo's tasks

Settings (all optional)::

    method: task_arithmetic             # or ties / dare / breadcrumbs / della with default settings, or a mapping:
                                        #   {name: ties, k: 0.6, scope: tensor}         k: share kept per task, scope: global/tensor
                                        #   {name: dare, p: 0.3, seed: 0, ties: {k: 0.5}}   p: drop probability; ties: TIES after
                                        #   {name: breadcrumbs, density: 0.9, gamma: 0.01, scope: tensor, rescale: l1,
                                        #    consensus: sum, normalize: true}
                                        #   {name: della, density: 0.5, epsilon: 0.15, seed: 0, scope: tensor, rescale: l1,
                                        #    consensus: sum, normalize: true}           rescale: l1 / inverse / null (true: l1)
                                        # stored results are keyed by the method and its settings
    preference: [1, 1]                  # the model to pick and save (nested merging's target); one weight per task
    seed: 0
    bounds: [0.0, 1.0]                  # the coefficient box searched
    out: outputs/map                    # result.json, front.png, merged/ (default outputs/<command> beside the config)
    store: outputs/map/evaluations.sqlite   # evaluation store (default out/evaluations.sqlite; resumes a run)
    budget: 22                          # map, bayes: real evaluations in all (default (T+1)(T+2))
    sampling: adaptive                  # map: adaptive / design (the authors' one-shot design)
    design: sobol                       # sobol (experts + Sobol) / map / lhs: how the first samples are placed
    num_samples: 12                     # map: older name of budget, with sampling: design
    acquisition: ehvi                   # bayes: ehvi / nehvi / binned
    samples_per_stage: 10               # nested: real evaluations per pairwise stage
    schedule: sequential                # nested: sequential (one pair at a time) / levels (disjoint pairs at once)
    moe_method: ls                      # moe: ls / epo
    moe_steps: 2000                     # moe: router training steps
    train_loss: my_eval.py:loss         # moe on own models: loss(model, task) -> scalar tensor on a training batch
    upcycle: mlp                        # moe on own models: mlp / all / a regex over module names
    groups:                             # coefficient groups: a coefficient per task and group (T x G, task-major,
      attn: self_attn                   #   named task/group); regexes over tensor names, first match wins,
      mlp: "\\\\.mlp\\\\."                   #   every tensor in exactly one group (end with a catch-all);
      rest: ".*"                        #   or {knots: 3}: depth knots interpolated over the layers (a mergekit gradient)
    ray:                                # evaluations on Ray workers (pip install 'map_merge[ray]'); omit to run here
      address: auto                     # join a running cluster; omit for a local runtime
      num_workers: 8                    # default: as many as the resources fit
      resources_per_worker: {GPU: 1}    # or {GPU: 0.25}: four small models per GPU; {CPU: 1} by default
      max_retries: 2                    # re-queues of an evaluation whose worker died or timed out
      timeout_s: 3600                   # an evaluation running longer has its worker killed and is re-queued
      load_timeout_s: 1800              # bound on a worker's first set-up of a model (not counted in timeout_s)
      placement_timeout_s: 300          # a worker Ray cannot place in this time is dropped (an error when none is left)

Results of an earlier run in 'out' are never replaced without --overwrite, which replaces only what
map_merge wrote there (never a file of yours); an 'out' inside a model source is refused.
"""
