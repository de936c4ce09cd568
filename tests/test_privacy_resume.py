"""A DP run killed mid-round and resumed reports the same epsilon, the same adaptive clip norms and
the same final adapter as the uninterrupted run (the accountant and clip state are in the checkpoint;
the noise is drawn from derived seeds). Harness as in tests/test_resume.py: FEDPEFT_KILL_AT SIGKILLs."""

from helpers import TINY_CONFIG, assert_same_tensors, final_adapter, kill_and_resume, reference_run, run_events

OVERRIDES = ["federation.rounds=2", "evaluation.before_training=false", "output.report=false",
             "privacy.mode=central", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.05",
             "privacy.adaptive_clipping.enabled=true", "privacy.adaptive_clipping.count_noise_std=1.0"]


def _privacy(run_dir):
    return [{k: v for k, v in e.items() if k != "time"} for e in run_events(run_dir, "privacy")]


def test_kill_and_resume_gives_the_same_epsilon_and_adapter(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference_run(TINY_CONFIG, OVERRIDES, ref)
    resumed = kill_and_resume(TINY_CONFIG, OVERRIDES, run, "client:2:1")
    expected = _privacy(ref)
    assert [e["round"] for e in expected] == [1, 2]
    assert len({e["clip_norm"] for e in expected}) == 2  # the adaptive clip moved every round
    assert _privacy(run) == expected  # epsilon, clip norms, noisy counts: identical
    assert_same_tensors(final_adapter(ref), final_adapter(run))
    assert f"epsilon {expected[-1]['epsilon']:.3f}" in resumed.stdout + resumed.stderr
