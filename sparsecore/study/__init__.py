"""The study of "Is Pruning Compression? Investigating Pruning via Network Layer Similarity"
(Blakeney, Yan, Zong, WACV 2020), end to end.

For every model of the preset (and every seed):

1. train it dense, and a second time from another seed (dense-vs-dense is the baseline
   that says how similar two equally good networks are);
2. magnitude pruning with fine-tuning, iteratively: prune the dense net to the first
   sparsity, fine-tune, prune further to the next, fine-tune, ...;
3. post-pruning re-initialisation: the masks of step 2, a fresh random init, trained from
   scratch for the full schedule;
4. random sparse initialisation: random masks with the same per-layer densities, a fresh
   init, trained from scratch;
5. lottery-ticket rewinding: iterative magnitude pruning to the same sparsities, each round
   rewound to the dense run's weights at an early epoch and retrained from there;
6. one-shot pruning of the dense net to one sparsity in each pattern (global, every layer
   alike, ERK layer densities, whole blocks), fine-tuned;
7. on held-out data, layer by layer: SVCCA and CKA of every network against the dense
   original, a layer x layer similarity matrix, accuracy, and the inference time of each
   pruned net on dense kernels vs sparsecore.optimize() (each layer on the fastest of its
   dense and sparse kernels, all CPU cores unless --threads says otherwise).

The run directory gets report.md (tables of means and standard deviations over seeds; the
paper's findings checked against the numbers measured here, the first under fine-tuning and
under rewinding, each verdict by a stated rule on the seed-to-seed spread; accuracy against
measured speedup), results.json and PNG figures. Every stage is cached in
RUN/stages/<model>/s<seed>/<stage>-<fingerprint>, the fingerprint a hash of the settings the
stage depends on and of its inputs' fingerprints: the same command after a kill redoes
nothing that finished (an interrupted training stage continues from its last finished
epoch), and the command with one setting changed reruns only the stages it affects (--fresh
deletes the run and starts over). While a study runs it holds RUN/.study.lock: a second
study on the same --out stops at once. The stages run on this machine (in --jobs processes)
or, with --executor dask, on a Dask distributed cluster.

presets:
  default   sklearn digits (8x8), Conv-2, VGG-11 and ResNet-20 at reduced width,
            sparsities 50/75/90 %, 3 seeds: under 10 minutes on a quiet 2-core CPU
  wacv2020  CIFAR-10 (--data PATH), ResNet-20, VGG-16 and Conv-4 with full schedules:
            meant for a GPU (hours per seed; --dry-run prints the plan and an estimate)
  pai       pruning at initialisation (magnitude, random, random rescaled, ERK, SNIP, GraSP,
            SynFlow) of VGG-16 and ResNet-20 at reduced width on digits, compressions
            10^0.5 .. 10^3, each trained from scratch: accuracy vs compression with layer
            collapse marked, and the Ramanujan-graph metrics of each mask (study.pai)
  transformer
            a character-level Transformer on CPython's help text: magnitude, re-init,
            random and TPrune-style block pruning; bits per character, SVCCA / CKA of the
            attention output, MLP output and residual stream, and the speed of each pruned
            net on the CSR and BSR kernels (study.lm): minutes on a 2-core CPU
  test      a tiny synthetic run that takes seconds (the test suite's)
"""

from __future__ import annotations

from sparsecore.study._common import METHOD_TEXT, METHODS
from sparsecore.study.analysis import (
    Check,
    Finding,
    analyse,
    divergence,
    findings,
    layer_similarity,
)
from sparsecore.study.config import (
    MIN_POINTS,
    PRESETS,
    ModelPlan,
    Preset,
    StudyConfig,
    add_arguments,
    check_metrics,
    check_points,
    config_from_args,
    preset_config,
)
from sparsecore.study.inference import (
    block_size_of,
    dense_twin,
    inference_times,
    sparse_model,
    sparse_twin,
    timing,
)
from sparsecore.study.report import write_report
from sparsecore.study.runner import RunSummary, open_run_dir, run, run_stage
from sparsecore.study.stages import SEED_DENSE2, SEED_RANDOM, SEED_REINIT, Stage, plan_stages

__all__ = [
    "METHODS", "METHOD_TEXT", "SEED_DENSE2", "SEED_REINIT", "SEED_RANDOM",
    "ModelPlan", "StudyConfig", "Preset", "PRESETS", "preset_config", "add_arguments",
    "config_from_args", "check_metrics", "check_points", "MIN_POINTS", "Stage", "plan_stages",
    "run_stage", "layer_similarity", "analyse", "Check", "Finding", "findings", "divergence",
    "sparse_model", "block_size_of", "sparse_twin", "dense_twin", "inference_times", "timing",
    "RunSummary", "run", "open_run_dir", "write_report",
]
