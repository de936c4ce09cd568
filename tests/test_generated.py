from fedpeft.data.generated import GENERATORS, generate_split, generate_task


def test_deterministic_and_independent_per_task():
    assert generate_task("arithmetic", 20, seed=1) == generate_task("arithmetic", 20, seed=1)
    assert generate_task("arithmetic", 20, seed=1) != generate_task("arithmetic", 20, seed=2)


def test_answers_are_exact():
    for rec in generate_task("arithmetic", 50, 0):
        a, b = [int(t.strip(".")) for t in rec["instruction"].split() if t.strip(".").isdigit()]
        assert rec["output"] == str(a + b)
    for rec in generate_task("reverse", 20, 0):
        seq = rec["instruction"].split(": ", 1)[1].split()
        assert rec["output"].split() == seq[::-1]
    for rec in generate_task("sort_numbers", 20, 0):
        nums = [int(x) for x in rec["instruction"].split(": ", 1)[1].split()]
        assert [int(x) for x in rec["output"].split()] == sorted(nums)


def test_eval_prompts_never_in_training_and_every_task_present():
    tasks = list(GENERATORS)
    train, evaluation = generate_split(tasks, 300, 25, seed=0)
    seen = {r["instruction"] for r in train}
    assert not any(r["instruction"] in seen for r in evaluation)
    for task in tasks:
        assert sum(r["task"] == task for r in evaluation) == 25, task
        assert sum(r["task"] == task for r in train) == 300
