from fedpeft.data.encoding import IGNORE_INDEX, collate, encode_example, format_prompt
from fedpeft.models.registry import tiny_tokenizer


def test_loss_only_on_target_and_eos():
    tok = tiny_tokenizer()
    ex = encode_example("Add 1 and 2.\n", "3", tok, max_len=64)
    prompt_len = len(tok("Add 1 and 2.\n", add_special_tokens=False)["input_ids"])
    assert ex.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex.labels[prompt_len:] == ex.input_ids[prompt_len:]
    assert tok.decode(ex.input_ids[prompt_len:-1]) == "3"
    assert ex.input_ids[-1] == tok.eos_token_id


def test_long_prompt_is_cut_from_the_left_target_kept():
    tok = tiny_tokenizer()
    ex = encode_example("x" * 100 + "END", "answer", tok, max_len=20)
    assert len(ex.input_ids) == 20
    assert tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX][:-1]) == "answer"
    assert tok.decode(ex.input_ids[:13]).endswith("END")


def test_target_that_cannot_fit_is_dropped_not_cut():
    tok = tiny_tokenizer()
    assert encode_example("q", "y" * 30, tok, max_len=20) is None


def test_collate_pads_with_ignored_labels():
    tok = tiny_tokenizer()
    a = encode_example("a\n", "1", tok, 32)
    b = encode_example("longer prompt\n", "22", tok, 32)
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE_INDEX).all()


def test_templates():
    tok = tiny_tokenizer()
    rec = {"instruction": "Do it", "input": "ctx"}
    assert "### Input:\nctx" in format_prompt(rec, "alpaca", tok)
    assert format_prompt(rec, "chat", tok).endswith("<s>assistant\n")
    assert format_prompt({"instruction": "Do it"}, "plain", tok) == "Do it\n"
