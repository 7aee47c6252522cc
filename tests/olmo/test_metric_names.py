"""Metric names round-trip between writers and readers."""

from olmo import metric_names as names


def test_eval_loss_label_inverts_eval_loss():
    for label in ("val", "shakespeare_val", "c4-en"):
        assert names.eval_loss_label(names.eval_loss(label)) == label
    for key in (names.CE_LOSS, names.eval_perplexity("val"), "eval/a/b/CrossEntropyLoss",
                names.expert_count(0, 1)):
        assert names.eval_loss_label(key) is None


def test_expert_count_names_share_the_prefix():
    assert names.expert_count(3, 7).startswith(names.EXPERT_LOAD_PREFIX)
    assert names.expert_count(3, 7) != names.expert_count(7, 3)
