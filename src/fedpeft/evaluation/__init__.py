"""Evaluation: evaluators over (model with adapters, task data) and benchmark suites by name.

* ``loglik``: ``score_continuations`` (batched log p(continuation | context)), multiple choice with
  ``acc``/``acc_norm`` as lm-evaluation-harness, LM loss / perplexity;
* ``generation``: batched greedy generation with left padding;
* ``extraction``: answer extraction from generations (LLM-Adapters labels, last number, option letter);
* ``judge``: MT-Bench two-turn answers graded by an OpenAI-compatible endpoint or a local model;
* ``suites``: ``commonsense8``, ``mmlu``, ``gsm8k``, ``mt_bench``, ``glue``, ``dolly`` -> ``run_suite``;
* ``lm_eval_bridge``: optional lm-evaluation-harness tasks on our model (``lm_eval:<task>``).

Modules are imported on use (``from fedpeft.evaluation.suites import run_suite``), so importing the
package stays cheap.
"""
