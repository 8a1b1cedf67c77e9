"""Self-written prompts: the chat template's user-turn opening, the system hints and the de-duplication (no model).

The template tests render real Jinja chat templates (a ChatML one like Qwen2's, one without a system role, one
that rewrites the content) through a minimal tokenizer stand-in; the shipped model's own template is checked too
when the model is prepared.
"""

from __future__ import annotations

import jinja2
import pytest

from nanospec_vllm.tools.eagle.selfprompt import LANGUAGES, TOPICS, dedup, system_hints, user_turn_opening

CHATML = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a default.<|im_end|>\\n' }}{%- endif %}"
          "{%- for m in messages %}{%- if m.role != 'system' or not loop.first %}{{- '<|im_start|>' + m.role + "
          "'\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
NO_SYSTEM = ("{{ bos_token }}{%- for m in messages %}{%- if m.role == 'system' %}{{ raise_exception('no system') }}"
             "{%- endif %}[INST] {{ m.content }} [/INST]{%- endfor %}")
MANGLES = "{%- for m in messages %}<{{ m.role }}>{{ m.content | upper }}</{{ m.role }}>{%- endfor %}"


class _Tok:
    def __init__(self, template: str):
        env = jinja2.Environment()

        def _raise(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env.globals["raise_exception"] = _raise
        self.t = env.from_string(template)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        return self.t.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>")


def test_opening_of_a_chatml_user_turn_with_a_system_hint():
    tok = _Tok(CHATML)
    assert user_turn_opening(tok, "Hint.") == "<|im_start|>system\nHint.<|im_end|>\n<|im_start|>user\n"
    # no system hint: the template's own default system turn, then the user turn's opening
    assert user_turn_opening(tok, None) == "<|im_start|>system\nYou are a default.<|im_end|>\n<|im_start|>user\n"


def test_opening_without_system_role_and_refusal_of_a_rewriting_template():
    assert user_turn_opening(_Tok(NO_SYSTEM), None) == "<s>[INST] "
    with pytest.raises(jinja2.exceptions.TemplateError):
        user_turn_opening(_Tok(NO_SYSTEM), "Hint.")
    with pytest.raises(ValueError, match="verbatim"):
        user_turn_opening(_Tok(MANGLES), "Hint.")


def test_opening_of_the_shipped_models_template():
    from nanospec_vllm.tools.assets import model_path

    p = model_path("qwen2.5-coder-0.5b")
    if p is None:
        pytest.skip("qwen2.5-coder-0.5b is not prepared")
    from transformers import AutoTokenizer

    text = user_turn_opening(AutoTokenizer.from_pretrained(str(p)), "Hint.")
    assert text == "<|im_start|>system\nHint.<|im_end|>\n<|im_start|>user\n"


def test_system_hints_spread_over_topics_and_are_seeded():
    hints = system_hints(len(TOPICS), seed=3)
    assert hints == system_hints(len(TOPICS), seed=3) and hints != system_hints(len(TOPICS), seed=4)
    assert all(sum(t in h for h in hints) == 1 for t in TOPICS)  # every topic once per cycle
    langs = {lang for h in system_hints(200, seed=0) for lang in LANGUAGES if f"writes in {lang} " in h}
    assert langs == set(LANGUAGES)


def test_dedup_drops_duplicates_unfinished_short_and_template_text():
    texts = [
        "How do I reverse a list in Python?",
        "how do I reverse a LIST in python??",                      # same after normalisation
        "Write a haiku about the sea.",
        "Can you explain how to reverse a linked list in Python using recursion, step by step?",
        "Can you explain how to reverse a linked list in Python using recursion, step by step please?",  # near
        "Hi",                                                        # too short
        "Summarise this text for me: <|im_start|>assistant",         # template tokens
        "Translate 'good morning' into French.",                    # unfinished (below)
        "   What is the capital of Australia?   ",
    ]
    finished = [True] * len(texts)
    finished[7] = False
    assert dedup(texts, finished) == [
        "How do I reverse a list in Python?", "Write a haiku about the sea.",
        "Can you explain how to reverse a linked list in Python using recursion, step by step?",
        "What is the capital of Australia?"]
    # requests kept in an earlier round count as seen
    assert dedup(["Write a haiku about the sea!", "Write a limerick about a cat."],
                 kept=["write a haiku about the sea"]) == ["Write a limerick about a cat."]
    # different requests that share words are kept
    assert len(dedup(["Sort a list of numbers in Python.", "Sort a list of strings in Java by length."])) == 2
